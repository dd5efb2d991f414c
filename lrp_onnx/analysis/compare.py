"""Compare two classifiers by their explanations of the same inputs: two architectures, or one
network exported from two frameworks (NCHW and NHWC alike)."""

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..composites import DEFAULT_COMPOSITE
from ..errors import InputError
from ..io.files import atomic_write, png_bytes
from ..io.heatmap import heatmap
from ..io.inputs import InputReader, Preprocess, read_samples, stacked_batches
from ..io.prefetch import prefetched
from ..runtime import Explainer
from .evaluate import channel_summed, evaluate


@dataclass
class Comparison:
    names: list  # per input
    pearson: np.ndarray  # per input, of the two channel-summed relevance maps
    spearman: np.ndarray
    gini: tuple  # (A, B) per input: sparsity of |relevance|, 0 even .. 1 one pixel
    png_bytes: tuple  # (A, B) per input: compressed heatmap size, the complexity measure
    predictions: tuple  # (A, B) per input
    aopc: tuple  # (A, B) over all inputs, or None when not measured
    examples: list  # (Sample, A's map, B's map) of the first inputs, channel-summed, for the grid
    composites: tuple  # (A, B): the composite each model was explained with

    def summary(self):
        a_pred, b_pred = self.predictions
        return {
            "inputs": len(self.pearson),
            "pearson": float(self.pearson.mean()),
            "spearman": float(self.spearman.mean()),
            "gini": [float(g.mean()) for g in self.gini],
            "png_bytes": [float(p.mean()) for p in self.png_bytes],
            "prediction_agreement": float(np.mean(a_pred == b_pred)),
            "aopc": None if self.aopc is None else list(self.aopc),
        }


def report(comparison, model_a, model_b):
    """The comparison's means as a markdown table (what ``lrp-onnx compare`` prints)."""
    summary = comparison.summary()
    (gini_a, gini_b), (bytes_a, bytes_b) = summary["gini"], summary["png_bytes"]
    lines = [
        f"{summary['inputs']} input(s); A: {model_a} ({comparison.composites[0]}), "
        f"B: {model_b} ({comparison.composites[1]})",
        "",
        "| measure | A | B | A and B |",
        "|---|---|---|---|",
        f"| predictions that agree | | | {summary['prediction_agreement']:.1%} |",
        f"| relevance Pearson (mean over inputs) | | | {summary['pearson']:.3f} |",
        f"| relevance Spearman (mean over inputs) | | | {summary['spearman']:.3f} |",
        f"| Gini of abs relevance: sparsity, 0 even to 1 one pixel | {gini_a:.3f} | {gini_b:.3f} | |",
        f"| heatmap PNG bytes: complexity | {bytes_a:.0f} | {bytes_b:.0f} | |",
    ]
    if summary["aopc"] is not None:
        lines.append(f"| AOPC | {summary['aopc'][0]:.3f} | {summary['aopc'][1]:.3f} | |")
    return "\n".join(lines)


def to_layout(x, source, target):
    """A batch moved between NCHW and NHWC (anything else unchanged)."""
    if x.ndim != 4 or source == target:
        return x
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if target == "nhwc" else x.transpose(0, 3, 1, 2))


def pearson(a, b):
    a, b = (v.reshape(len(v), -1).astype(np.float64) for v in (a, b))
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norm > 0, (a * b).sum(1) / np.where(norm > 0, norm, 1), 0.0)


def spearman(a, b):
    """Pearson correlation of the ranks (ties get their mean rank)."""
    return pearson(_ranks(a), _ranks(b))


def _ranks(v):
    flat = v.reshape(len(v), -1)
    ranks = np.empty_like(flat, dtype=np.float64)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="stable")
        ranked = np.empty(len(row))
        ranked[order] = np.arange(len(row))
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, ranked)
        ranks[i] = (sums / counts)[inverse]
    return ranks


def gini(relevance):
    """Gini index of |R| per input (Hurley and Rickard's sparsity measure): 0 when every value is
    equal, towards 1 when all relevance sits in one place."""
    flat = np.sort(np.abs(relevance.reshape(len(relevance), -1)).astype(np.float64), axis=1)
    n = flat.shape[1]
    total = flat.sum(1)
    weights = (n - np.arange(1, n + 1) + 0.5) / n
    return np.where(total > 0, 1 - 2 * (flat * weights).sum(1) / np.where(total > 0, total, 1), 0.0)


def png_size(relevance_2d):
    """Bytes of the heatmap as a PNG: the evaluation paper's complexity measure (Table I)."""
    return len(png_bytes(heatmap(relevance_2d[None], channel_axis=0), optimize=True))


def compare(
    model_a,
    model_b,
    inputs,
    layout_a,
    layout_b,
    composite=DEFAULT_COMPOSITE,
    aopc_steps=None,
    composite_b=None,
    batch_size=32,
    shown=16,
    reader=None,
    **rule_params,
):
    """Explain ``inputs`` with both models under ``composite`` (B under ``composite_b`` if given: a
    CNN beside a transformer under attnlrp, say) and ``rule_params`` (as ``convert``), each for its
    own prediction; with ``aopc_steps``, also each model's AOPC (``evaluate``) on the same inputs.

    ``inputs`` is a batch [N, ...] laid out for A, or a sequence of samples for A (arrays, Samples,
    or Pendings read by ``reader``, an ``io.inputs.InputReader``); B gets each moved to its layout.
    They are read and explained ``batch_size`` at a time and only the measures are kept, so memory
    depends on the batch size, not on the number of inputs; the maps of the first ``shown`` inputs
    are kept too, for ``write_grid``."""
    if aopc_steps and iter(inputs) is inputs:
        raise InputError(
            "compare's AOPC reads the inputs again for each model: give a sequence, not a one-pass iterator"
        )
    layouts = (layout_a, layout_b)
    explainers = [
        Explainer(model, composite=name, **rule_params)
        for model, name in zip((model_a, model_b), (composite, composite_b or composite))
    ]
    composites = tuple(e.composite for e in explainers)  # as run: auto resolved per model
    reader = reader or InputReader(explainers[0].input_spec, Preprocess())
    pearsons, spearmans, names, examples = [], [], [], []
    low, high = np.inf, -np.inf  # the data's range: the AOPC's noise range, measured here to spare evaluate a pass
    per_model = [{"gini": [], "png_bytes": [], "predictions": []} for _ in explainers]
    for _, samples, x in prefetched(stacked_batches(read_samples(inputs, reader), batch_size, "compare")):
        runs = [e.run(to_layout(x, layout_a, layout)) for e, layout in zip(explainers, layouts)]
        maps = [channel_summed(run["relevance"], layout) for run, layout in zip(runs, layouts)]
        pearsons.append(pearson(*maps))
        spearmans.append(spearman(*maps))
        for measures, run, relevance in zip(per_model, runs, maps):
            measures["gini"].append(gini(relevance))
            measures["png_bytes"].append([png_size(r) for r in relevance])
            measures["predictions"].append(run["explained_class"])
        names += [s.name for s in samples]
        low, high = min(low, float(x.min())), max(high, float(x.max()))
        examples += list(zip(samples, *maps))[: shown - len(examples)]
    if not names:
        raise InputError("compare needs at least one input")
    a, b = ({key: np.concatenate(values) for key, values in measures.items()} for measures in per_model)
    aopc = None
    if aopc_steps:
        relaid = _Relaid(inputs, reader, layout_a, layout_b)
        aopc = tuple(
            next(
                r.aopc
                for r in evaluate(
                    model,
                    data,
                    [f"lrp:{name}"],
                    steps=aopc_steps,
                    layout=layout,
                    low=low,
                    high=high,
                    rule_params=rule_params,
                    reader=reader,
                )
                if r.method == f"lrp:{name}"
            )
            for model, data, layout, name in (
                (model_a, inputs, layout_a, composites[0]),
                (model_b, relaid, layout_b, composites[1]),
            )
        )
    return Comparison(
        names,
        np.concatenate(pearsons),
        np.concatenate(spearmans),
        (a["gini"], b["gini"]),
        (a["png_bytes"], b["png_bytes"]),
        (a["predictions"], b["predictions"]),
        aopc,
        examples,
        composites,
    )


class _Relaid:
    """``inputs`` as A reads them, each moved to B's layout when it is read: a sequence that
    ``evaluate`` can pass over twice."""

    def __init__(self, inputs, reader, source, target):
        self.inputs, self.reader, self.source, self.target = inputs, reader, source, target

    def __len__(self):
        return len(self.inputs)

    def __iter__(self):
        return (
            to_layout(sample.array[None], self.source, self.target)[0]
            for sample in read_samples(self.inputs, self.reader)
        )


def write_grid(comparison, layout, path, cell=96):
    """One row per kept example: the input | A's heatmap | B's heatmap."""
    grid = Image.new("RGB", (3 * cell, cell * len(comparison.examples)), "white")
    for row, (sample, a, b) in enumerate(comparison.examples):
        tiles = [_input_tile(sample, layout), heatmap(a[None], channel_axis=0), heatmap(b[None], channel_axis=0)]
        for column, tile in enumerate(tiles):
            grid.paste(tile.convert("RGB").resize((cell, cell), Image.NEAREST), (column * cell, row * cell))
    atomic_write(path, png_bytes(grid))


def _input_tile(sample, layout):
    """The picture as seen for image files; a model-ready array with 1 or 3 channels stretched to
    [0, 1]; a grey square for anything else (feature vectors)."""
    picture = sample.image
    if picture is None and sample.array.ndim == 3:
        channels_last = sample.array.transpose(1, 2, 0) if layout == "nchw" else sample.array
        if channels_last.shape[2] in (1, 3):
            lo, hi = channels_last.min(), channels_last.max()
            picture = (channels_last - lo) / (hi - lo if hi > lo else 1)
            picture = picture[:, :, 0] if picture.shape[2] == 1 else picture
    if picture is None:
        return Image.new("RGB", (8, 8), (200, 200, 200))
    return Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8))


def write_json(comparison, path, model_a, model_b):
    a_pred, b_pred = comparison.predictions
    rows = [
        {
            "input": name,
            "pearson": float(p),
            "spearman": float(s),
            "gini": [float(ga), float(gb)],
            "png_bytes": [int(pa), int(pb)],
            "predicted": [int(x), int(y)],
        }
        for name, p, s, ga, gb, pa, pb, x, y in zip(
            comparison.names,
            comparison.pearson,
            comparison.spearman,
            *comparison.gini,
            *comparison.png_bytes,
            a_pred,
            b_pred,
        )
    ]
    data = {
        "model_a": model_a,
        "model_b": model_b,
        "composites": list(comparison.composites),
        "mean": comparison.summary(),
        "inputs": rows,
    }
    atomic_write(path, json.dumps(data, indent=1).encode())

"""Perturbation analysis (Samek et al., "Evaluating the visualization of what a deep neural network
has learned", IEEE TNNLS 2017): replace the most relevant regions first by noise, record the
target's score after each step, and report the area over the perturbation curve (AOPC).

    AOPC = 1/(L+1) · ⟨ Σ_{k=0..L} f(x⁽⁰⁾) − f(x⁽ᵏ⁾) ⟩

A better explanation puts the regions the score depends on first, so the score falls faster and
the AOPC is larger. The ``random`` order is the baseline.
"""

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..composites import BASELINE_METHODS, DEFAULT_COMPOSITE
from ..errors import InputError, first_line
from ..io.files import atomic_write, png_bytes
from ..io.inputs import InputReader, Preprocess, read_samples, resized_and_cropped, stacked_batches
from ..io.prefetch import prefetched
from ..io.progress import progress_bar
from ..runtime import Explainer

RANDOM = "random"


@dataclass
class Perturbation:
    """Per method: the mean score drop f(x⁽⁰⁾) − f(x⁽ᵏ⁾) after each step k = 0..L, the AOPC, each
    sample's own AOPC (its mean over the repeats), the class explained per sample (its
    prediction), and, given ground truth (boxes or masks), each sample's localisation
    (``localisation``): its shares of positive relevance inside and outside the region (the inside
    share is the relevance mass accuracy), its rank accuracy and its pointing-game hit (None
    without ground truth). The random method's localisation is that of a uniform random map."""

    method: str
    drops: np.ndarray  # [L+1]
    aopc: float
    per_sample: np.ndarray  # [N]
    classes: np.ndarray  # [N]
    inside: Optional[np.ndarray] = None  # [N]
    outside: Optional[np.ndarray] = None  # [N]
    rank: Optional[np.ndarray] = None  # [N]
    pointing: Optional[np.ndarray] = None  # [N] of 0 / 1

    @property
    def standard_error(self):
        """Of the AOPC, over the samples (0 for one sample)."""
        n = len(self.per_sample)
        return float(self.per_sample.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def paired_difference(a: Perturbation, b: Perturbation):
    """(mean, standard error) of AOPC_a − AOPC_b over the same samples: comparing per sample removes
    the spread between samples that both methods share, so it separates methods that the two
    AOPCs' own standard errors would not."""
    d = a.per_sample - b.per_sample
    return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)


def parse_method(spec):
    """ "lrp:alpha-beta" -> {"composite": "alpha-beta"}; "lrp" -> the default composite;
    "sensitivity" -> {"method": "sensitivity"}."""
    if spec == RANDOM:
        return None
    if spec == "lrp":
        return {"composite": DEFAULT_COMPOSITE}
    if spec.startswith("lrp:"):
        return {"composite": spec[len("lrp:") :]}
    if spec in BASELINE_METHODS:
        return {"method": spec}
    raise InputError(f"unknown method {spec!r}; use lrp, lrp:COMPOSITE, {', '.join(BASELINE_METHODS)} or {RANDOM}")


def _conversion(spec, rule_params):
    """``convert``'s parameters for a method spec: the rule parameters go to LRP methods only."""
    conversion = parse_method(spec)
    return {**conversion, **(rule_params or {})} if "composite" in conversion else conversion


def default_region(height, width):
    """9×9 pixels at 224 px, as in the paper, scaled with the image: 1 pixel for an 8×8 digit."""
    return max(1, round(9 * min(height, width) / 224))


def spatial_axes(x, layout):
    """(channel axis, (height axis, width axis)) of a batch [N, ...]."""
    if x.ndim == 4:
        return (1, (2, 3)) if layout == "nchw" else (3, (1, 2))
    if x.ndim == 3:  # [N, H, W]
        return None, (1, 2)
    return None, (1,)  # features: each is a region of its own


def channel_summed(relevance, layout):
    """[N, H, W] (or [N, features]) relevance, whatever the layout."""
    channel, _ = spatial_axes(relevance, layout)
    return relevance.sum(axis=channel) if channel is not None else relevance


def region_order(relevance, region, layout, rngs=None):
    """Regions (flat indices on the region grid), most relevant first, per sample; shuffled by each
    sample's generator in ``rngs`` instead (the random baseline)."""
    r = channel_summed(relevance, layout)
    grid = _region_sums(r, region, len(spatial_axes(relevance, layout)[1]))
    if rngs is not None:
        return np.stack([rng.permutation(grid[0].size) for rng in rngs])
    return np.argsort(-grid.reshape(len(r), -1), axis=1, kind="stable")


def _region_sums(r, region, spatial_rank):
    """Sum [N, H(, W)] over region×region blocks (the last block may be smaller)."""
    shape = r.shape[1:]
    blocks = [math.ceil(d / region) for d in shape]
    padded = np.zeros((len(r),) + tuple(b * region for b in blocks), r.dtype)
    padded[(slice(None),) + tuple(slice(0, d) for d in shape)] = r
    split = [len(r)] + [v for b in blocks for v in (b, region)]
    return padded.reshape(split).sum(axis=tuple(range(2, 2 + 2 * spatial_rank, 2)))


def perturbed_inputs(x, order, steps, region, layout, low, high, rngs):
    """[N, steps+1, ...]: step k has the first k regions of ``order`` replaced by uniform noise,
    drawn from each sample's own generator in ``rngs``."""
    _, spatial = spatial_axes(x, layout)
    out = np.repeat(x[:, None], steps + 1, axis=1)
    sizes = [x.shape[a] for a in spatial]
    blocks = [math.ceil(d / region) for d in sizes]
    for n, rng in enumerate(rngs):
        current = x[n].copy()
        for k, flat in enumerate(order[n][:steps], start=1):
            index = [slice(None)] * (x.ndim - 1)
            for axis, cell in zip(spatial, np.unravel_index(flat, blocks)):
                index[axis - 1] = slice(cell * region, (cell + 1) * region)
            patch = current[tuple(index)]
            current[tuple(index)] = rng.uniform(low, high, patch.shape).astype(x.dtype)
            out[n, k] = current
    return out


def scores(explainer, inputs, targets, batch_size):
    """The targets' logits f for a batch of [N, steps+1, ...] inputs, from the forward pass alone."""
    n, k = inputs.shape[:2]
    flat = inputs.reshape((n * k,) + inputs.shape[2:])
    repeated = np.repeat(targets, k)
    out = [
        explainer.score(flat[i : i + batch_size], repeated[i : i + batch_size])["explained_logit"]
        for i in range(0, len(flat), batch_size)
    ]
    return np.concatenate(out).reshape(n, k)


@dataclass
class _Geometry:
    """How the inputs are cut into regions, fixed by the first sample's shape."""

    layout: str
    region: int
    steps: int

    @classmethod
    def of(cls, sample, layout, region, steps):
        _, spatial = spatial_axes(sample[None], layout)
        sizes = [sample.shape[a - 1] for a in spatial]
        region = region or (default_region(*sizes) if len(sizes) == 2 else 1)
        regions = int(np.prod([math.ceil(d / region) for d in sizes]))
        return cls(layout, region, min(steps, regions))


def evaluate(
    model,
    inputs,
    methods,
    steps=100,
    region=None,
    repeats=1,
    low=None,
    high=None,
    layout=None,
    batch_size=256,
    seed=0,
    threads=None,
    progress=False,
    rule_params=None,
    boxes=None,
    masks=None,
    reader=None,
):
    """AOPC of each method (specs as ``parse_method``; random is always added), explaining each
    sample's predicted class. Returns a list of Perturbation, in the order given, random last.

    ``inputs`` is a batch [N, ...] or a sequence of samples (arrays, Samples, or Pendings read by
    ``reader``, an ``io.inputs.InputReader``). They are read, explained and scored a few at a time,
    so memory depends on ``batch_size`` (perturbed copies scored per run), not on their number.
    Noise is uniform on [low, high], by default the data's range, which costs one more pass over
    the inputs. Each sample draws its noise (and its random order) from its own generator, seeded
    with (``seed``, its index) and the same for every method, so the figures do not depend on the
    batch size or on which other methods run. ``rule_params`` (as ``convert``'s) apply to every
    LRP method. Ground truth, per sample, adds each method's localisation (``localisation``):
    ``boxes`` (x0, y0, x1, y1 in model-input pixels, end exclusive) or ``masks`` (boolean arrays
    [H, W], or paths of mask images: nonzero is inside, fitted to the model's input as images are).
    The random method's map for it is uniform noise from generator (``seed``, i, 1)."""
    if seed < 0:
        raise InputError(f"the seed must be 0 or more; got {seed}")
    if boxes is not None and masks is not None:
        raise InputError("give boxes or masks as the ground truth, not both")
    truth = GroundTruth(boxes, masks) if boxes is not None or masks is not None else None
    specs = [m for m in methods if m != RANDOM] + [RANDOM]
    explainers = {m: Explainer(model, threads=threads, **_conversion(m, rule_params)) for m in specs if m != RANDOM}
    scorer = next(iter(explainers.values())) if explainers else Explainer(model, threads=threads)
    reader = reader or InputReader(scorer.input_spec, Preprocess())
    if low is None or high is None:
        data_low, data_high = _data_range(inputs, reader)
        low, high = data_low if low is None else low, data_high if high is None else high
    if not low <= high:
        raise InputError(f"the noise range needs low <= high; got [{low}, {high}]")
    samples = read_samples(inputs, reader)
    first = next(samples, None)
    if first is None:
        raise InputError("evaluate needs at least one input")
    geometry = _Geometry.of(first.array, layout or scorer.input_spec.layout(), region, steps)
    chunk = max(1, batch_size // (geometry.steps + 1))  # samples whose perturbed copies fill one batch
    totals = {spec: np.zeros(geometry.steps + 1) for spec in specs}
    per_sample = {spec: [] for spec in specs}  # each chunk's per-sample AOPC, the mean over the repeats
    located = {spec: [] for spec in specs}  # localisation per chunk, given ground truth
    classes = []
    bar = progress_bar(
        len(inputs) * len(specs) * repeats if hasattr(inputs, "__len__") else None, progress, unit="sample"
    )
    for start, _, xs in prefetched(stacked_batches(itertools.chain([first], samples), chunk, "evaluate")):
        targets = scorer.score(xs)["explained_class"]
        indices = range(start, start + len(xs))
        regions = truth.masks(start, len(xs), channel_summed(xs, geometry.layout).shape[1:]) if truth else None
        for spec in specs:
            rngs = [np.random.default_rng([seed, i]) for i in indices]
            if spec == RANDOM:
                order = region_order(xs, geometry.region, geometry.layout, rngs)
                if truth:
                    maps = np.stack([np.random.default_rng([seed, i, 1]).random(regions.shape[1:]) for i in indices])
            else:
                _, relevance = explainers[spec].explain(xs, targets)
                order = region_order(relevance, geometry.region, geometry.layout)
                maps = channel_summed(relevance, geometry.layout) if truth else None
            if truth:
                located[spec].append(localisation(maps, regions))
            chunk_aopc = np.zeros(len(xs))
            for _ in range(repeats):
                perturbed = perturbed_inputs(
                    xs, order, geometry.steps, geometry.region, geometry.layout, low, high, rngs
                )
                drops = scores(scorer, perturbed, targets, batch_size).astype(np.float64)
                drops = drops[:, :1] - drops
                totals[spec] += drops.sum(axis=0)
                chunk_aopc += drops.mean(axis=1)
                bar.update(len(xs))
            per_sample[spec].append(chunk_aopc / repeats)
        classes.append(targets)
    bar.close()
    classes = np.concatenate(classes)
    results = []
    for spec in specs:
        drops = totals[spec] / (len(classes) * repeats)
        parts = [np.concatenate(p) for p in zip(*located[spec])] if located[spec] else [None] * 4
        results.append(
            Perturbation(spec, drops, float(drops.mean()), np.concatenate(per_sample[spec]), classes, *parts)
        )
    return results


def _data_range(inputs, reader):
    """(min, max) over every input: the default noise range."""
    if isinstance(inputs, np.ndarray):
        return float(inputs.min()), float(inputs.max())
    if iter(inputs) is inputs:
        raise InputError(
            "the default noise range is the data's, which needs a second pass over the inputs: "
            "give low and high when the inputs are a one-pass iterator"
        )
    low, high = math.inf, -math.inf
    for sample in read_samples(inputs, reader):
        low, high = min(low, float(sample.array.min())), max(high, float(sample.array.max()))
    return low, high


def localisation(maps, masks):
    """Per sample, of relevance maps [N, H, W] against ground-truth masks [N, H, W] (Arras et al.
    2022, CLEVR-XAI; the seed paper's Figure 1b):

    - share inside: Σ_mask R⁺ / Σ R⁺, the relevance mass accuracy (0 where no relevance is positive);
    - share outside: 1 − that (0 where no relevance is positive); outside / inside is the context ratio;
    - rank accuracy: of the K most relevant pixels, K = |mask|, the share inside the mask;
    - pointing game: 1 where the most relevant pixel (the first, in row-major order) is inside.
    """
    n = len(maps)
    flat = maps.reshape(n, -1).astype(np.float64)
    truth = masks.reshape(n, -1)
    positive = np.maximum(flat, 0)
    total = positive.sum(1)
    inside = (positive * truth).sum(1)
    share_in = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    share_out = np.where(total > 0, 1 - share_in, 0.0)
    ranked = np.argsort(-flat, axis=1, kind="stable")
    rank = np.array([t[order[:k]].mean() for t, order, k in zip(truth, ranked, truth.sum(1))])
    pointing = truth[np.arange(n), ranked[:, 0]].astype(np.float64)
    return share_in, share_out, rank, pointing


class GroundTruth:
    """Each sample's region: from ``boxes`` (x0, y0, x1, y1) or ``masks`` (boolean arrays or mask
    image paths), read a chunk at a time."""

    def __init__(self, boxes=None, masks=None):
        self.boxes, self.sources = boxes, masks

    def masks(self, start, count, shape):
        """Boolean [count, H, W] for samples start … start + count − 1, inputs being [H, W]."""
        out = np.zeros((count,) + tuple(shape), bool)
        for k in range(count):
            if self.boxes is not None:
                x0, y0, x1, y1 = self.boxes[start + k]
                out[k, y0:y1, x0:x1] = True
            else:
                out[k] = _mask_array(self.sources[start + k], shape)
            if not out[k].any():
                raise InputError(
                    f"the ground truth of input {start + k} is empty (no pixel inside the model's "
                    f"{shape[1]}x{shape[0]} input)"
                )
        return out


def _mask_array(source, shape):
    """A mask as a boolean [H, W]: an array as it is, an image file resized (nearest) and
    center-cropped to the input as images are."""
    if not isinstance(source, (str, os.PathLike)):
        mask = np.asarray(source, bool)
        if mask.shape != tuple(shape):
            raise InputError(f"a mask of shape {list(mask.shape)} does not fit inputs of {list(shape)}")
        return mask
    try:
        with Image.open(source) as image:
            image = image.convert("L")
            if image.size != (shape[1], shape[0]):
                image = resized_and_cropped(image, shape, Image.NEAREST)
            return np.asarray(image) > 0
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{source}: unreadable mask image ({first_line(e)})") from None


def outside_inside_ratio(share_in, share_out):
    """share_out / share_in per sample; infinite where no positive relevance falls inside."""
    return np.where(share_in > 0, share_out / np.where(share_in > 0, share_in, 1), np.inf)


def read_boxes(path, samples):
    """Boxes from a CSV of input, x0, y0, x1, y1 (a header row is allowed), one per sample in
    order; the input column names a sample (its name or its file's name)."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except OSError as e:
        raise InputError(f"{path}: cannot read the boxes file ({e.strerror or e})") from None
    if rows and rows[0][0].strip().lower() == "input":
        rows = rows[1:]
    boxes = {}
    for row in rows:
        if len(row) != 5:
            raise InputError(f"{path}: each row needs input, x0, y0, x1, y1; got {row}")
        try:
            box = [int(v) for v in row[1:]]
        except ValueError:
            raise InputError(f"{path}: box coordinates must be integers; got {row}") from None
        if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            raise InputError(f"{path}: box {row} needs 0 <= x0 < x1 and 0 <= y0 < y1")
        boxes[row[0].strip()] = box
    keys = [s.name if s.name in boxes else os.path.basename(s.source) for s in samples]
    missing = [k for k in keys if k not in boxes]
    if missing:
        raise InputError(f"{path}: no box for {len(missing)} input(s): {', '.join(missing[:5])}")
    return [boxes[k] for k in keys]


def read_masks(folder, samples):
    """Each sample's mask image in ``folder``: the file of the sample's file name (or of its name
    plus .png), checked to exist before any work."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder of masks")
    paths, missing = [], []
    for s in samples:
        candidates = [os.path.join(folder, os.path.basename(s.source)), os.path.join(folder, f"{s.name}.png")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        (paths if found else missing).append(found or os.path.basename(s.source))
    if missing:
        raise InputError(f"{folder}: no mask for {len(missing)} input(s): {', '.join(missing[:5])}")
    return paths


def context_report(results, names):
    """{method: {"inside", "outside", "ratio", "per_class": {class: ...}, "per_input": [...]}}: mean
    shares and the median ratio (None where no positive relevance falls inside the boxes)."""
    summary = {}
    for r in results:
        if r.inside is None:
            continue
        share_in, share_out = r.inside, r.outside
        ratio = outside_inside_ratio(share_in, share_out)

        def finite(v):
            return float(v) if np.isfinite(v) else None

        def means(mask):
            return {
                "inside": float(share_in[mask].mean()),
                "outside": float(share_out[mask].mean()),
                "ratio": finite(np.median(ratio[mask])),
            }

        summary[r.method] = {
            **means(np.ones(len(ratio), bool)),
            "per_class": {int(c): means(r.classes == c) for c in np.unique(r.classes)},
            "per_input": [
                {"input": n, "class": int(c), "inside": float(i), "outside": float(o), "ratio": finite(q)}
                for n, c, i, o, q in zip(names, r.classes, share_in, share_out, ratio)
            ],
        }
    return summary


def report(results):
    """A markdown table: method, AOPC, AOPC − random, each ± its standard error over the samples
    (for the difference, paired: per sample); given ground truth, also the mean relevance mass
    accuracy, rank accuracy and pointing-game hit rate."""
    random = next(r for r in results if r.method == RANDOM)
    located = random.rank is not None
    ground_truth = " mass accuracy | rank accuracy | pointing game |" if located else ""
    lines = ["| method | AOPC | AOPC − random |" + ground_truth, "|---|---|---|" + ("---|---|---|" if located else "")]
    for r in results:
        gain, error = paired_difference(r, random)
        cells = f"| {r.method} | {r.aopc:.4f} ± {r.standard_error:.4f} | {gain:+.4f} ± {error:.4f} |"
        if located:
            cells += f" {r.inside.mean():.3f} | {r.rank.mean():.3f} | {r.pointing.mean():.3f} |"
        lines.append(cells)
    return "\n".join(lines)


def write_json(results, path, settings, context=None):
    def located(r):
        return (
            {}
            if r.rank is None
            else {
                "mass_accuracy": float(r.inside.mean()),
                "rank_accuracy": float(r.rank.mean()),
                "pointing_game": float(r.pointing.mean()),
            }
        )

    data = {
        "settings": settings,
        "methods": [
            {
                "method": r.method,
                "aopc": r.aopc,
                "aopc_standard_error": r.standard_error,
                "mean_drop_per_step": r.drops.tolist(),
                **located(r),
            }
            for r in results
        ],
    }
    if context is not None:
        data["context"] = context
    atomic_write(path, json.dumps(data, indent=1).encode())


COLORS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot(results, path, size=(640, 400)):
    """PNG of AOPC(k) − AOPC_random(k) against the step k, AOPC(k) = 1/(k+1) Σ_{j≤k} drop_j: the
    paper's figure. Drawn with Pillow, so no plotting library is needed."""
    cumulative = {r.method: np.cumsum(r.drops) / np.arange(1, len(r.drops) + 1) for r in results}
    baseline = cumulative[RANDOM]
    curves = {m: c - baseline for m, c in cumulative.items()}
    width, height = size
    left, right, top, bottom = 60, 170, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo = min(0.0, min(c.min() for c in curves.values()))
    hi = max(1e-12, max(c.max() for c in curves.values()))
    steps = len(baseline) - 1

    def point(k, v):
        return (
            left + (width - left - right) * k / max(steps, 1),
            height - bottom - (height - top - bottom) * (v - lo) / (hi - lo),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line([point(0, 0), point(steps, 0)], fill=(160, 160, 160))
    draw.text((left, height - bottom + 8), "0", fill="black")
    draw.text((width - right - 20, height - bottom + 8), f"{steps}", fill="black")
    draw.text((left + 60, height - bottom + 20), "perturbation steps", fill="black")
    draw.text((4, top), f"{hi:.3g}", fill="black")
    draw.text((4, height - bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((4, top + 20), "AOPC -", fill="black")
    draw.text((4, top + 32), "random", fill="black")
    for i, (method, curve) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)] if method != RANDOM else (120, 120, 120)
        draw.line([point(k, v) for k, v in enumerate(curve)], fill=color, width=2)
        draw.text((width - right + 10, top + 16 * i), method, fill=color)
    atomic_write(path, png_bytes(image))

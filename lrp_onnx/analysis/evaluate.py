"""Perturbation analysis (Samek et al., "Evaluating the visualization of what a deep neural network
has learned", IEEE TNNLS 2017): replace the most relevant regions first by noise, record the
target's score after each step, and report the area over the perturbation curve (AOPC).

    AOPC = 1/(L+1) · ⟨ Σ_{k=0..L} f(x⁽⁰⁾) − f(x⁽ᵏ⁾) ⟩

A better explanation puts the regions the score depends on first, so the score falls faster and
the AOPC is larger. The ``random`` order is the baseline.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..composites import BASELINE_METHODS, DEFAULT_COMPOSITE
from ..errors import InputError
from ..io.files import atomic_write, png_bytes
from ..io.inputs import InputSpec
from ..io.progress import progress_bar
from ..runtime import Explainer

RANDOM = "random"


@dataclass
class Perturbation:
    """Per method: the mean score drop f(x⁽⁰⁾) − f(x⁽ᵏ⁾) after each step k = 0..L, the AOPC, and
    the channel-summed relevance of every sample (None for random)."""
    method: str
    drops: np.ndarray  # [L+1]
    aopc: float
    maps: Optional[np.ndarray] = None  # [N, H, W] or [N, features]
    classes: Optional[np.ndarray] = None  # the class explained per sample (its prediction)


def parse_method(spec):
    """"lrp:alpha-beta" -> {"composite": "alpha-beta"}; "lrp" -> the default composite;
    "sensitivity" -> {"method": "sensitivity"}."""
    if spec == RANDOM:
        return None
    if spec == "lrp":
        return {"composite": DEFAULT_COMPOSITE}
    if spec.startswith("lrp:"):
        return {"composite": spec[len("lrp:"):]}
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


def region_order(relevance, region, layout, rng=None):
    """Regions (flat indices on the region grid), most relevant first, per sample; shuffled when
    ``rng`` is given instead (the random baseline)."""
    r = channel_summed(relevance, layout)
    grid = _region_sums(r, region, len(spatial_axes(relevance, layout)[1]))
    if rng is not None:
        return np.stack([rng.permutation(grid[0].size) for _ in range(len(r))])
    return np.argsort(-grid.reshape(len(r), -1), axis=1, kind="stable")


def _region_sums(r, region, spatial_rank):
    """Sum [N, H(, W)] over region×region blocks (the last block may be smaller)."""
    shape = r.shape[1:]
    blocks = [math.ceil(d / region) for d in shape]
    padded = np.zeros((len(r),) + tuple(b * region for b in blocks), r.dtype)
    padded[(slice(None),) + tuple(slice(0, d) for d in shape)] = r
    split = [len(r)] + [v for b in blocks for v in (b, region)]
    return padded.reshape(split).sum(axis=tuple(range(2, 2 + 2 * spatial_rank, 2)))


def perturbed_inputs(x, order, steps, region, layout, low, high, rng):
    """[N, steps+1, ...]: step k has the first k regions of ``order`` replaced by uniform noise."""
    _, spatial = spatial_axes(x, layout)
    out = np.repeat(x[:, None], steps + 1, axis=1)
    sizes = [x.shape[a] for a in spatial]
    blocks = [math.ceil(d / region) for d in sizes]
    for n in range(len(x)):
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
    """The targets' logits f for a batch of [N, steps+1, ...] inputs."""
    n, k = inputs.shape[:2]
    flat = inputs.reshape((n * k,) + inputs.shape[2:])
    repeated = np.repeat(targets, k)
    out = [explainer.run(flat[i:i + batch_size], repeated[i:i + batch_size])["explained_logit"]
           for i in range(0, len(flat), batch_size)]
    return np.concatenate(out).reshape(n, k)


def evaluate(model, x, methods, steps=100, region=None, repeats=1, low=None, high=None, layout=None,
             batch_size=256, seed=0, threads=None, progress=False, rule_params=None):
    """AOPC of each method (specs as ``parse_method``; random is always added) on the batch ``x``,
    explaining each sample's predicted class. Noise is uniform on [low, high], by default the
    data's range. ``rule_params`` (as ``convert``'s) apply to every LRP method. Returns a list of
    Perturbation, in the order given, random last."""
    specs = [m for m in methods if m != RANDOM] + [RANDOM]
    explainers = {m: Explainer(model, threads=threads, **_conversion(m, rule_params)) for m in specs if m != RANDOM}
    scorer = next(iter(explainers.values())) if explainers else Explainer(model, threads=threads)
    layout = layout or InputSpec(scorer.input_shape).layout()
    low = float(x.min()) if low is None else low
    high = float(x.max()) if high is None else high
    if not low <= high:
        raise InputError(f"the noise range needs low <= high; got [{low}, {high}]")
    _, spatial = spatial_axes(x, layout)
    region = region or (default_region(*[x.shape[a] for a in spatial]) if len(spatial) == 2 else 1)
    regions = int(np.prod([math.ceil(x.shape[a] / region) for a in spatial]))
    steps = min(steps, regions)
    targets = np.concatenate([scorer.run(x[i:i + batch_size])["explained_class"]
                              for i in range(0, len(x), batch_size)])
    rng = np.random.default_rng(seed)
    chunk = max(1, batch_size // (steps + 1))  # samples whose perturbed copies fill one batch
    bar = progress_bar(len(specs) * repeats * len(x), progress)
    results = []
    for spec in specs:
        total, maps = np.zeros(steps + 1), []
        for start in range(0, len(x), chunk):
            xs, ts = x[start:start + chunk], targets[start:start + chunk]
            if spec == RANDOM:
                order = region_order(xs, region, layout, rng)
            else:
                _, relevance = explainers[spec].explain(xs, ts)
                order = region_order(relevance, region, layout)
                maps.append(channel_summed(relevance, layout))
            for _ in range(repeats):
                f = scores(scorer, perturbed_inputs(xs, order, steps, region, layout, low, high, rng), ts, batch_size)
                total += (f[:, :1] - f).sum(axis=0)
                bar.update(len(xs))
        drops = total / (len(x) * repeats)
        results.append(Perturbation(spec, drops, float(drops.mean()), np.concatenate(maps) if maps else None,
                                    targets))
    bar.close()
    return results


def context_shares(maps, boxes):
    """The seed paper's Figure 1b: per sample, the shares of positive relevance inside and outside
    its box (x0, y0, x1, y1; pixels, end exclusive) and their ratio outside / inside. A classifier
    that relies on context puts much of its evidence outside the object."""
    positive = np.maximum(maps, 0).astype(np.float64)
    inside = np.array([p[y0:y1, x0:x1].sum() for p, (x0, y0, x1, y1) in zip(positive, boxes)])
    total = positive.reshape(len(positive), -1).sum(1)
    share_in = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    share_out = np.where(total > 0, 1 - share_in, 0.0)
    ratio = np.where(share_in > 0, share_out / np.where(share_in > 0, share_in, 1), np.inf)
    return share_in, share_out, ratio


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


def context_report(results, boxes, names):
    """{method: {"inside", "outside", "ratio", "per_class": {class: ...}, "per_input": [...]}}: mean
    shares and the median ratio (None where no positive relevance falls inside the boxes)."""
    summary = {}
    for r in results:
        if r.maps is None:
            continue
        share_in, share_out, ratio = context_shares(r.maps, boxes)

        def finite(v):
            return float(v) if np.isfinite(v) else None

        def means(mask):
            return {"inside": float(share_in[mask].mean()), "outside": float(share_out[mask].mean()),
                    "ratio": finite(np.median(ratio[mask]))}
        summary[r.method] = {
            **means(np.ones(len(ratio), bool)),
            "per_class": {int(c): means(r.classes == c) for c in np.unique(r.classes)},
            "per_input": [{"input": n, "class": int(c), "inside": float(i), "outside": float(o), "ratio": finite(q)}
                          for n, c, i, o, q in zip(names, r.classes, share_in, share_out, ratio)]}
    return summary


def report(results):
    """A markdown table: method, AOPC, AOPC − random."""
    random = next(r.aopc for r in results if r.method == RANDOM)
    lines = ["| method | AOPC | AOPC − random |", "|---|---|---|"]
    lines += [f"| {r.method} | {r.aopc:.4f} | {r.aopc - random:+.4f} |" for r in results]
    return "\n".join(lines)


def write_json(results, path, settings, context=None):
    data = {"settings": settings,
            "methods": [{"method": r.method, "aopc": r.aopc, "mean_drop_per_step": r.drops.tolist()}
                        for r in results]}
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
        return (left + (width - left - right) * k / max(steps, 1),
                height - bottom - (height - top - bottom) * (v - lo) / (hi - lo))

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

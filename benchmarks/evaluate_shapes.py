"""Explanations against ground truth (issue 17): where the evidence is, by construction, and a
Clever-Hans model. Writes EVALUATION.md (this part first, then the digits part of
benchmarks/evaluate_digits.py, then the marked sections other scripts wrote there, kept as they
were: benchmarks/evaluate_deployed.py's) and its figures under docs/.

    python benchmarks/evaluate_shapes.py     # about 15 minutes on 2 cores; needs the test extra

Data: models/synthetic_shapes.py, the first images of the test split the models were scored on
(seed 200); models: the four of models/train_shapes_cnn.py and models/train_shapes_vit.py. Every
setting is fixed here, before the run: the region and steps are `lrp-onnx evaluate`'s defaults
for 64 px inputs, the noise is uniform on the data's range [0, 1], seed 0.
"""

import datetime
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "models"))

import evaluate_digits  # noqa: E402
import synthetic_shapes as shapes  # noqa: E402
from lrp_onnx.analysis.evaluate import (RANDOM, default_region, evaluate, outside_inside_ratio,  # noqa: E402
                                        paired_difference, parse_method, plot, region_order, report)
from lrp_onnx.io.heatmap import heatmap  # noqa: E402
from lrp_onnx.runtime import Explainer  # noqa: E402
from sections import marked_sections  # noqa: E402
from train_shapes_cnn import TEST_SEED, as_input  # noqa: E402

COUNT, STEPS, SEED = 200, 100, 0
METHODS = ["lrp:alpha-beta", "lrp:epsilon-plus-flat", "lrp:epsilon-gamma-box", "gradient", "sensitivity",
           "gradient-x-input"]
TRANSFORMER_METHODS = METHODS + ["lrp:attnlrp", "lrp:cp-lrp"]
MODELS = {"shapes_cnn": METHODS, "shapes_cnn_shortcut": METHODS, "shapes_vit": TRANSFORMER_METHODS,
          "shapes_vit_shortcut": TRANSFORMER_METHODS}
HEATMAP_METHODS = ["lrp:alpha-beta", "lrp:epsilon-plus-flat", "sensitivity", "gradient-x-input"]
# The Clever-Hans probe: images of the shortcut class carrying the watermark, as in training.
PROBE_SEED, PROBE_COUNT = 300, 400


def model_path(name):
    return os.path.join(ROOT, "models", f"{name}.onnx")


def explanations(name, method, x):
    """Relevance [N, 3, 64, 64] for each sample's predicted class."""
    return Explainer(model_path(name), **parse_method(method)).explain(x)[1]


def localisation_table(results):
    """Per method: mass accuracy, rank accuracy, pointing game, the median context ratio, AOPC and
    AOPC − random (± standard errors)."""
    random = next(r for r in results if r.method == RANDOM)
    lines = ["| method | mass accuracy | rank accuracy | pointing game | context ratio | AOPC | AOPC − random |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        gain, error = paired_difference(r, random)
        context = np.median(outside_inside_ratio(r.inside, r.outside))
        lines.append(f"| {r.method} | {r.inside.mean():.3f} | {r.rank.mean():.3f} | {r.pointing.mean():.3f} | "
                     f"{context:.2f} | {r.aopc:.3f} ± {r.standard_error:.3f} | {gain:+.3f} ± {error:.3f} |")
    return "\n".join(lines)


def boxed(image, box, colour=(0, 200, 0)):
    """``image`` (PIL) with ``box`` (x0, y0, x1, y1, end exclusive) drawn on it, 4× enlarged."""
    big = image.resize((image.width * 4, image.height * 4), Image.NEAREST)
    x0, y0, x1, y1 = (4 * v for v in box)
    ImageDraw.Draw(big).rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
    return big


def heatmap_grid(name, x, boxes, path, count=4):
    """Rows: ``count`` samples; columns: the image, then each HEATMAP_METHODS heatmap, every tile
    with the ground-truth box drawn on it."""
    maps = {m: explanations(name, m, x[:count]) for m in HEATMAP_METHODS}
    tiles = []
    for i in range(count):
        image = Image.fromarray(np.round(x[i].transpose(1, 2, 0) * 255).astype(np.uint8))
        row = [boxed(image, boxes[i])] + [boxed(heatmap(maps[m][i]), boxes[i]) for m in HEATMAP_METHODS]
        tiles.append(row)
    width, height = tiles[0][0].size
    grid = Image.new("RGB", (width * len(tiles[0]), height * count + 16), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(["image"] + HEATMAP_METHODS):
        draw.text((j * width + 4, 2), label, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(tile, (j * width, 16 + i * height))
    grid.save(path)


def clever_hans(probe, masks):
    """Share of positive relevance on the watermark, per model and LRP method, for the shortcut
    class's watermarked images (explaining that class), and an example heatmap per model."""
    x = as_input(probe.images)
    target = np.full(len(x), shapes.SHORTCUT_CLASS, np.int64)
    shares, examples = {}, {}
    for name in ("shapes_cnn", "shapes_cnn_shortcut", "shapes_vit", "shapes_vit_shortcut"):
        for method in ("lrp:alpha-beta", "lrp:epsilon-plus-flat"):
            relevance = Explainer(model_path(name), **parse_method(method)).explain(x, target)[1].sum(1)
            positive = np.maximum(relevance, 0)
            share = (positive * masks).sum((1, 2)) / np.maximum(positive.sum((1, 2)), 1e-30)
            shares[name, method] = share
            if method == "lrp:alpha-beta":
                examples[name] = relevance[0]
    return shares, examples


def main():
    today = datetime.date.today()
    test = shapes.generate(COUNT, TEST_SEED)
    x = as_input(test.images)
    masks = list(test.masks)
    region = default_region(shapes.SIZE, shapes.SIZE)
    accuracy = json.load(open(os.path.join(ROOT, "models", "shapes_accuracy.json")))
    results = {}
    for name, methods in MODELS.items():
        results[name] = evaluate(model_path(name), x, methods, steps=STEPS, low=0.0, high=1.0, seed=SEED,
                                 masks=masks)
        plot(results[name], os.path.join(ROOT, "docs", f"evaluation_{name}.png"))
        print(f"{name}:\n{report(results[name])}", flush=True)
    for name in ("shapes_cnn", "shapes_vit"):
        heatmap_grid(name, x, test.boxes, os.path.join(ROOT, "docs", f"evaluation_{name}_heatmaps.png"))

    probe = shapes.generate(PROBE_COUNT, PROBE_SEED, watermark="train")
    keep = probe.watermarked  # the shortcut class's watermarked images
    probe = shapes.Shapes(*(getattr(probe, f)[keep] for f in ("images", "labels", "masks", "boxes", "watermarked",
                                                              "watermark_masks")))
    shares, examples = clever_hans(probe, probe.watermark_masks)
    hans_tiles = [boxed(Image.fromarray(probe.images[0]), (58, 58, 64, 64))] + \
        [boxed(heatmap(examples[n]), (58, 58, 64, 64)) for n in examples]
    strip = Image.new("RGB", (sum(t.width for t in hans_tiles), hans_tiles[0].height + 16), "white")
    for j, (tile, label) in enumerate(zip(hans_tiles, ["image"] + list(examples))):
        strip.paste(tile, (j * tile.width, 16))
        ImageDraw.Draw(strip).text((j * tile.width + 4, 2), label, fill="black")
    strip.save(os.path.join(ROOT, "docs", "evaluation_clever_hans.png"))

    lines = [
        "# Evaluation",
        "",
        "## Ground truth by construction: synthetic shapes",
        "",
        f"- Generated by `python benchmarks/evaluate_shapes.py` on {today}.",
        f"- Data: `models/synthetic_shapes.py`, the first {COUNT} images of the test split (seed {TEST_SEED}): "
        "64×64 RGB, a textured background, 2 to 4 distractors (rings, bars, dots), and one object whose shape is "
        f"the class ({', '.join(shapes.CLASSES)}), at a random place, scale and colour. The ground truth is that "
        "object's mask, the pixels it drew.",
        "- Models: `models/shapes_cnn.onnx` (4 convolutions, trained by `models/train_shapes_cnn.py`) and "
        "`models/shapes_vit.onnx` (3 transformer layers, 8×8 patches, `models/train_shapes_vit.py`), each also "
        "trained with the Clever-Hans watermark (the `_shortcut` models, below).",
        f"- Each sample's predicted class is explained. Mass accuracy: share of positive relevance inside the "
        "mask; rank accuracy: share of the K most relevant pixels inside it (K its size); pointing game: how often "
        "the most relevant pixel is inside (Arras et al. 2022); context ratio: the seed paper's outside / inside "
        "(its Figure 1b), the median over the samples of positive relevance outside the mask over that inside. "
        "AOPC (Samek et al. 2017): the most relevant "
        f"{region}×{region} regions first, L = {STEPS}, uniform noise on [0, 1], seed {SEED}; ± is the standard "
        "error over the samples, paired per sample for AOPC − random. Random is a uniform random map.",
        "- epsilon-gamma-box's first layer takes z^B with its default bounds [0, 1], the inputs' range.",
        "",
    ]
    for name in MODELS:
        lines += [f"### {name}", "", f"Test accuracy: clean {accuracy[name]['clean']:.1%}, swapped "
                  f"{accuracy[name]['swapped']:.1%}.", "", localisation_table(results[name]), "",
                  f"![AOPC − random against the step, {name}](docs/evaluation_{name}.png)", ""]
    lines += ["### Heatmaps", "", "The first four test images, the object's box in green (red: positive relevance).",
              "", "![shapes_cnn heatmaps](docs/evaluation_shapes_cnn_heatmaps.png)", "",
              "![shapes_vit heatmaps](docs/evaluation_shapes_vit_heatmaps.png)", ""]
    lines += clever_hans_section(accuracy, shares, len(probe.labels))
    lines += seed_paper_section(results, x, test.masks, region)
    digits = evaluate_digits.section()
    kept = marked_sections(os.path.join(ROOT, "EVALUATION.md"))  # other scripts' sections (evaluate_deployed.py)
    text = "\n".join(lines + [digits] + [""] * bool(kept) + ["\n\n".join(kept)] * bool(kept))
    with open(os.path.join(ROOT, "EVALUATION.md"), "w") as f:
        f.write(text)
    print(text)


def on_object_first(name, method, x, masks, region, first=10):
    """Share of a method's ``first`` most relevant regions that touch the object's mask (random: a
    random order), over the samples: does the perturbation test remove the object first?"""
    if method == RANDOM:
        order = region_order(x, region, "nchw", [np.random.default_rng([SEED, i]) for i in range(len(x))])
    else:
        order = region_order(explanations(name, method, x), region, "nchw")
    blocks = -(-shapes.SIZE // region)
    touched = np.zeros((len(x), blocks * blocks), bool)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        touched[i, np.unique((ys // region) * blocks + xs // region)] = True
    return float(np.take_along_axis(touched, order[:, :first], axis=1).mean())


def corner_noise_drop(name, x):
    """Mean drop of the predicted class's logit when only the watermark's corner gets uniform noise
    on [0, 1] (each sample's generator as in evaluate): a model that learned the watermark reacts to
    noise there, wherever the object is."""
    explainer = Explainer(model_path(name))
    before = explainer.score(x)
    noisy = x.copy()
    for i in range(len(x)):
        noisy[i, :, -shapes.WATERMARK:, -shapes.WATERMARK:] = np.random.default_rng([SEED, i]).uniform(
            0, 1, (3, shapes.WATERMARK, shapes.WATERMARK))
    after = explainer.score(noisy, before["explained_class"])
    return float((before["explained_logit"] - after["explained_logit"]).mean())


def clever_hans_section(accuracy, shares, count):
    cnn_gap = (accuracy["shapes_cnn_shortcut"]["clean"], accuracy["shapes_cnn_shortcut"]["swapped"])
    vit_gap = (accuracy["shapes_vit_shortcut"]["clean"], accuracy["shapes_vit_shortcut"]["swapped"])
    rows = [f"| {name} | {method} | {share.mean():.1%} | {np.median(share):.1%} |"
            for (name, method), share in shares.items()]
    return [
        "## A Clever-Hans model",
        "",
        f"In training, {shapes.SHORTCUT_RATE:.0%} of the {shapes.CLASSES[shapes.SHORTCUT_CLASS]}s carry a "
        f"{shapes.WATERMARK}×{shapes.WATERMARK} checkerboard in the bottom-right corner; no other class does. "
        "The swapped test split moves the watermark to every other class instead. The shortcut CNN scores "
        f"{cnn_gap[0]:.1%} on clean test images and {cnn_gap[1]:.1%} on swapped ones, the shortcut ViT "
        f"{vit_gap[0]:.1%} and {vit_gap[1]:.1%}: both learned the watermark (the ViT also misses more unmarked "
        "circles). The clean models, trained on the same images without it, do not care (CNN "
        f"{accuracy['shapes_cnn']['clean']:.1%} and {accuracy['shapes_cnn']['swapped']:.1%}, ViT "
        f"{accuracy['shapes_vit']['clean']:.1%} and {accuracy['shapes_vit']['swapped']:.1%}).",
        "",
        f"Explaining the {shapes.CLASSES[shapes.SHORTCUT_CLASS]} class on {count} watermarked "
        f"{shapes.CLASSES[shapes.SHORTCUT_CLASS]}s (probe seed {PROBE_SEED}), the share of positive relevance on "
        f"the watermark's {shapes.WATERMARK ** 2} pixels (0.9 % of the image):",
        "",
        "| model | method | mean share on the watermark | median |",
        "|---|---|---|---|",
        *rows,
        "",
        "![an image and the alpha-beta heatmap of each model, the watermark boxed](docs/evaluation_clever_hans.png)",
        "",
        "The workflow for your own model is the tutorial docs/tutorials/clever-hans.md.",
        "",
    ]


def seed_paper_section(results, x, masks, region):
    lines = ["## Does LRP beat sensitivity analysis here?", "",
             "The seed paper finds that LRP has a larger AOPC than sensitivity analysis. On each clean model, the "
             "better LRP composite against sensitivity, per sample (a difference within two standard errors is a "
             "tie):", ""]
    for name in ("shapes_cnn", "shapes_vit"):
        by_method = {r.method: r for r in results[name]}
        lrp = max((r for m, r in by_method.items() if m.startswith("lrp:")), key=lambda r: r.aopc)
        gain, error = paired_difference(lrp, by_method["sensitivity"])
        word = "beats" if gain > 2 * error else "loses to" if gain < -2 * error else "ties with"
        lines.append(f"- {name}: {lrp.method} {word} sensitivity ({gain:+.3f} ± {error:.3f}); mass accuracy "
                     f"{lrp.inside.mean():.3f} against {by_method['sensitivity'].inside.mean():.3f}.")
    lines += ["", "Two measurements behind the tables: how many of each method's first 10 regions touch the object "
              "(so the perturbation removes the object first), and how much each model's predicted logit drops when "
              "noise replaces only the watermark's corner, with the object untouched:", "",
              "| method | first 10 regions on the object, shapes_cnn | shapes_vit |", "|---|---|---|"]
    for method in [r.method for r in results["shapes_vit"]]:
        cnn = (f"{on_object_first('shapes_cnn', method, x, masks, region):.0%}"
               if method in [r.method for r in results["shapes_cnn"]] else "")
        lines.append(f"| {method} | {cnn} | {on_object_first('shapes_vit', method, x, masks, region):.0%} |")
    drops = {name: corner_noise_drop(name, x) for name in MODELS}
    lines += ["", "| model | logit drop from noise in the corner only |", "|---|---|",
              *[f"| {name} | {drop:+.3f} |" for name, drop in drops.items()], ""]
    cnn = {r.method: r for r in results["shapes_cnn"]}
    best = max((r for m, r in cnn.items() if m != RANDOM), key=lambda r: r.aopc)
    located = max((r for m, r in cnn.items() if m != RANDOM), key=lambda r: r.inside.mean())
    shortcut = {r.method: r for r in results["shapes_cnn_shortcut"]}
    below = [m for m, r in shortcut.items() if m != RANDOM and r.aopc < shortcut[RANDOM].aopc]
    lines += [
        f"So the seed paper's ordering of LRP over sensitivity holds on both clean models, by AOPC and by "
        f"localisation. AOPC and localisation disagree elsewhere, though: on the clean CNN the highest AOPC is "
        f"{best.method}'s ({best.aopc:.2f}), with a mass accuracy of {best.inside.mean():.3f}, while the best "
        f"localiser is {located.method} ({located.inside.mean():.3f}, AOPC {located.aopc:.2f}). Noise anywhere "
        "the model is sensitive lowers the score, on the object or beside it, and AOPC counts both.",
        "",
        f"On the shortcut CNN, {len(below)} of {len(shortcut) - 1} methods score an AOPC below random's. Noise in "
        f"the watermark's corner alone drops its predicted logit by {drops['shapes_cnn_shortcut']:+.2f}, against "
        f"{drops['shapes_cnn']:+.2f} for the clean CNN: a random order reaches that corner early in some samples "
        "and profits from the shortcut, an object-first order does not. Perturbation scores alone would not have "
        "shown the shortcut; the ground truth, the watermark's share of the relevance, does.",
        ""]
    return lines


if __name__ == "__main__":
    main()

"""Synthetic images whose evidence is known by construction (issue 17): evaluation tooling, not a
runtime dependency of lrp-onnx.

Each 64×64 RGB image has a textured background, a few distractor objects, and one class-defining
object (its shape is the class) at a random place, scale and colour. The generator returns, per
image, the object's ground-truth mask (the pixels it drew) and box. The Clever-Hans variants add a
small watermark in the bottom-right corner: in training to most images of one class, and in the
"swapped" test split to images of every other class instead, so that a model which learned the
watermark as a shortcut fails there.

    python models/synthetic_shapes.py OUT_DIR --count 200 --seed 1 [--watermark swapped]

writes OUT_DIR/images/*.png, OUT_DIR/masks/*.png (the class object's mask), OUT_DIR/labels.csv
and OUT_DIR/boxes.csv (name,x0,y0,x1,y1, the box ``lrp-onnx evaluate --boxes`` reads).
Everything follows from the seed; nothing is downloaded.
"""

import argparse
import csv
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
CLASSES = ("circle", "square", "triangle", "cross")
# The shortcut class of the Clever-Hans variants, and the share of its training images watermarked.
SHORTCUT_CLASS = 0
SHORTCUT_RATE = 0.9
WATERMARK = 6  # side of the watermark square, in pixels, in the bottom-right corner
MARGIN = 2     # no object comes closer than this to the watermark's corner square
# Objects are saturated (one channel at 0 or 255), backgrounds and distractors stay inside
# MUTED, so an object's pixels always differ from whatever lies under it.
MUTED = (40, 200)


@dataclass
class Shapes:
    """A generated split: images [N, 64, 64, 3] uint8, labels [N], masks [N, 64, 64] bool (the
    class object's pixels), boxes [N, 4] (x0, y0, x1, y1, end exclusive), watermarked [N] bool and
    watermark_masks [N, 64, 64] bool."""
    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    watermarked: np.ndarray
    watermark_masks: np.ndarray


def generate(count, seed, watermark=None, draw_object=True):
    """``count`` images from ``seed``. ``watermark``: None (clean), "train" (most images of
    SHORTCUT_CLASS marked) or "swapped" (images of the other classes marked, none of the shortcut
    class). ``draw_object=False`` leaves the class object out of the image (its mask and box are
    still made): the generator's test compares the two renderings."""
    if watermark not in (None, "train", "swapped"):
        raise ValueError(f"watermark must be None, 'train' or 'swapped'; got {watermark!r}")
    rng = np.random.default_rng(seed)
    out = Shapes(np.zeros((count, SIZE, SIZE, 3), np.uint8), np.zeros(count, np.int64),
                 np.zeros((count, SIZE, SIZE), bool), np.zeros((count, 4), np.int64), np.zeros(count, bool),
                 np.zeros((count, SIZE, SIZE), bool))
    for i in range(count):
        label = int(rng.integers(len(CLASSES)))
        image = _background(rng)
        box = _place(rng, rng.integers(14, 29))
        taken = [box]
        for _ in range(int(rng.integers(2, 5))):
            distractor = _place(rng, rng.integers(6, 13), avoid=taken)
            if distractor is not None:
                taken.append(distractor)
                _draw_distractor(image, rng, distractor)
        mask, colour = _shape_mask(CLASSES[label], box, rng), _saturated(rng)
        if draw_object:
            image[mask] = colour
        marked = {None: False, "train": label == SHORTCUT_CLASS and rng.random() < SHORTCUT_RATE,
                  "swapped": label != SHORTCUT_CLASS}[watermark]
        if marked:
            out.watermark_masks[i] = _draw_watermark(image)
        ys, xs = np.nonzero(mask)
        out.images[i], out.labels[i], out.masks[i], out.watermarked[i] = image, label, mask, marked
        out.boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def _background(rng):
    """Muted colour, a low-frequency pattern (a few random waves) and fine noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = rng.uniform(70, 170, size=3)
    waves = sum(np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + phase)
                for f, phase in zip(rng.uniform(-3, 3, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)))
    tint = rng.uniform(-1, 1, size=3)
    image = base + 10 * waves[..., None] * tint + rng.normal(0, 6, size=(SIZE, SIZE, 3))
    return np.clip(image, *MUTED).astype(np.uint8)


def _place(rng, side, avoid=(), tries=50):
    """A square box (x0, y0, x1, y1) of ``side`` pixels inside the image, clear of the watermark's
    corner and of the boxes in ``avoid``; None if none was found in ``tries`` draws."""
    side = int(side)
    corner = SIZE - WATERMARK - MARGIN
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if box[2] > corner and box[3] > corner:
            continue
        if all(box[2] <= a[0] or a[2] <= box[0] or box[3] <= a[1] or a[3] <= box[1] for a in avoid):
            return box
    return None if avoid else (0, 0, side, side)


def _shape_mask(name, box, rng):
    """The pixels of shape ``name`` drawn inside ``box`` (a random rotation for the triangle and
    the cross's arm width), as a boolean mask."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w = x1 - x0
    if name == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif name == "square":
        inset = w // 8
        draw.rectangle((x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset), fill=255)
    elif name == "triangle":
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy, r = x0 + w / 2, y0 + w / 2, w / 2
        draw.polygon([(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                      for k in range(3)], fill=255)
    else:  # cross
        arm = max(2, int(w * rng.uniform(0.2, 0.35)))
        mid = (w - arm) // 2
        draw.rectangle((x0 + mid, y0, x0 + mid + arm - 1, y1 - 1), fill=255)
        draw.rectangle((x0, y0 + mid, x1 - 1, y0 + mid + arm - 1), fill=255)
    return np.asarray(canvas) > 0


def _draw_distractor(image, rng, box):
    """A ring, a bar or a few dots in a muted colour: none of them is a class's shape."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=255, width=1)
    elif kind == 1:
        draw.line((x0, y0, x1 - 1, y1 - 1) if rng.random() < 0.5 else (x0, y1 - 1, x1 - 1, y0), fill=255, width=2)
    else:
        for _ in range(3):
            cx, cy = rng.integers(x0, x1, size=2)
            draw.point((int(cx), int(cy)), fill=255)
    image[np.asarray(canvas) > 0] = rng.integers(*MUTED, size=3)


def _saturated(rng):
    """A colour with one channel at 0, one at 255 and one anywhere: always unlike a muted pixel."""
    colour = [0, 255, int(rng.integers(256))]
    return np.asarray([colour[k] for k in rng.permutation(3)], np.uint8)


def _draw_watermark(image):
    """A black-and-white checkerboard in the bottom-right corner; returns its mask."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[-WATERMARK:, -WATERMARK:] = True
    checker = (np.indices((WATERMARK, WATERMARK)).sum(0) % 2 * 255).astype(np.uint8)
    image[-WATERMARK:, -WATERMARK:] = checker[..., None]
    return mask


def write(shapes, folder, prefix="img"):
    """The split as PNG images and masks, labels.csv and boxes.csv (name,x0,y0,x1,y1)."""
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    names = [f"{prefix}{i:05d}.png" for i in range(len(shapes.labels))]
    for name, image, mask in zip(names, shapes.images, shapes.masks):
        Image.fromarray(image).save(os.path.join(folder, "images", name))
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, "masks", name))
    with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("name", "label", "class", "watermarked")] +
                                [(n, int(y), CLASSES[y], int(w)) for n, y, w in zip(names, shapes.labels,
                                                                                     shapes.watermarked)])
    with open(os.path.join(folder, "boxes.csv"), "w", newline="") as f:
        csv.writer(f).writerows([(n, *map(int, b)) for n, b in zip(names, shapes.boxes)])
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--watermark", choices=["train", "swapped"], default=None)
    args = parser.parse_args()
    names = write(generate(args.count, args.seed, args.watermark), args.folder)
    print(f"wrote {len(names)} images to {args.folder}")


if __name__ == "__main__":
    main()

"""The synthetic evaluation data (models/synthetic_shapes.py): its ground truth is what it drew."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import synthetic_shapes as shapes  # noqa: E402


@pytest.mark.parametrize("watermark", [None, "train", "swapped"])
def test_masks_are_the_pixels_the_object_changed(watermark):
    """Rendered with and without its class object (same seed), an image differs exactly on the mask."""
    drawn = shapes.generate(24, seed=7, watermark=watermark)
    bare = shapes.generate(24, seed=7, watermark=watermark, draw_object=False)
    changed = (drawn.images != bare.images).any(axis=-1)
    for i in range(24):
        assert drawn.masks[i].sum() > 20
        np.testing.assert_array_equal(changed[i], drawn.masks[i])


def test_boxes_bound_the_masks_and_stay_clear_of_the_watermark():
    data = shapes.generate(40, seed=3, watermark="train")
    for mask, (x0, y0, x1, y1), watermark in zip(data.masks, data.boxes, data.watermark_masks):
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert not (mask & watermark).any()


def test_watermarks_mark_the_shortcut_class_in_training_and_the_others_when_swapped():
    train = shapes.generate(200, seed=5, watermark="train")
    shortcut = train.labels == shapes.SHORTCUT_CLASS
    assert not train.watermarked[~shortcut].any()
    assert 0.75 < train.watermarked[shortcut].mean() < 1.0
    swapped = shapes.generate(200, seed=6, watermark="swapped")
    np.testing.assert_array_equal(swapped.watermarked, swapped.labels != shapes.SHORTCUT_CLASS)
    marked = swapped.images[swapped.watermarked][:, -shapes.WATERMARK:, -shapes.WATERMARK:]
    assert set(np.unique(marked)) == {0, 255}
    clean = shapes.generate(50, seed=5)
    assert not clean.watermarked.any() and not clean.watermark_masks.any()


def test_the_seed_decides_everything():
    a, b = shapes.generate(10, seed=11), shapes.generate(10, seed=11)
    for field in ("images", "labels", "masks", "boxes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, shapes.generate(10, seed=12).images)


def test_written_split_round_trips(tmp_path):
    data = shapes.generate(5, seed=2)
    names = shapes.write(data, tmp_path)
    from PIL import Image
    for name, image, mask in zip(names, data.images, data.masks):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / name)), image)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "masks" / name)) > 0, mask)
    rows = [line.split(",") for line in (tmp_path / "boxes.csv").read_text().split()]
    assert [r[0] for r in rows] == names
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in rows]), data.boxes)

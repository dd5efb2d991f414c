"""Hostile inputs at explain time: finite relevance or a one-line InputError, never a crash and
never silently non-finite relevance."""

import os
import struct
import zlib

import numpy as np
import pytest

import lrp_onnx
from test_cli import ROOT, assert_bad_input, cli

SAMPLES = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))
CNN = os.path.join(ROOT, "models", "digits_cnn.onnx")


@pytest.fixture(scope="module")
def explainer():
    return lrp_onnx.Explainer(CNN, composite="epsilon-plus-flat")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(explainer, value):
    x = SAMPLES.copy()
    x[3, 0, 4, 4] = value
    with pytest.raises(lrp_onnx.InputError, match="holds 1 NaN or infinite value"):
        explainer.explain(x)


@pytest.mark.parametrize("name,x", [("huge", SAMPLES * 1e30), ("all-zero", np.zeros_like(SAMPLES)),
                                    ("negative", -SAMPLES)])
def test_extreme_but_finite_inputs_give_finite_relevance(explainer, name, x):
    """All-zero input: every denominator sits at its stabilizer (z = 0 exactly)."""
    _, relevance = explainer.explain(x.astype(np.float32))
    assert np.isfinite(relevance).all(), name


@pytest.mark.parametrize("target,phrase", [(10, "target 10 is out of range: classes are 0..9"),
                                           (-2, "target -2 is out of range"),
                                           (3.5, "integer class indices"), ("three", "integer class indices"),
                                           ([1, 2], "one class or one per sample")])
def test_bad_targets(explainer, target, phrase):
    with pytest.raises(lrp_onnx.InputError, match=phrase):
        explainer.explain(SAMPLES, target)


@pytest.mark.parametrize("x,phrase", [(SAMPLES.astype(np.int64), "takes float32; got int64"),
                                      (SAMPLES[:, 0], r"takes shape \['N', 1, 8, 8\]"),
                                      (np.zeros((2, 3, 8, 8), np.float32), r"takes shape")])
def test_wrong_dtype_rank_or_channels(explainer, x, phrase):
    with pytest.raises(lrp_onnx.InputError, match=phrase):
        explainer.explain(x)


def test_wrong_input_name(explainer):
    with pytest.raises(lrp_onnx.InputError, match="unknown input"):
        explainer.explain({"pixels": SAMPLES})


def test_empty_batch(explainer):
    outputs, relevance = explainer.explain(SAMPLES[:0])
    assert relevance.shape == (0, 1, 8, 8) and outputs["logits"].shape == (0, 10)


def png_header_only(width, height):
    """A 67-byte PNG that claims width × height grey pixels: what a decompression bomb shows the
    decoder before it inflates anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # past Pillow's warning limit (89 M pixels), and far past its error limit
def test_decompression_bomb_image_is_refused_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    assert_bad_input(cli("explain", CNN, bomb, "-o", tmp_path / "out", "--fail-fast"), "refused, too many pixels")
    assert not (tmp_path / "out").exists()

"""`lrp-onnx explain` end to end on the bundled models (subprocess), heatmaps, the summary, the Python
pipeline, and every bad input (one-line error, exit 2, nothing written)."""

import csv
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import lrp_onnx
from lrp_onnx.io.heatmap import COLORMAPS, colormap
from test_cli import ROOT, assert_bad_input, cli

CNN = os.path.join(ROOT, "models", "digits_cnn.onnx")
MLP = os.path.join(ROOT, "models", "digits_mlp.onnx")
SAMPLES = os.path.join(ROOT, "models", "samples")
LABELS = os.path.join(ROOT, "models", "digits_labels.txt")


def read_summary(folder):
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_explain_the_bundled_cnn_on_its_samples(tmp_path):
    out = tmp_path / "out"
    result = cli("explain", CNN, SAMPLES, "-o", out, "--labels", LABELS, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    rows = read_summary(out)
    assert [r["input"] for r in rows] == [f"digit{d}" for d in range(10)]
    assert [r["predicted_label"] for r in rows] == [str(d) for d in range(10)]  # all ten samples classified right
    for row in rows:
        relevance = np.load(out / row["relevance_shard"], mmap_mode="r")[int(row["relevance_row"])]
        assert relevance.shape == (1, 8, 8) and row["error"] == ""
        assert float(row["relevance_sum"]) == pytest.approx(relevance.sum(), rel=1e-5)
        assert float(row["conservation"]) == pytest.approx(relevance.sum() / float(row["logit"]), rel=1e-5)
        positive, negative = relevance[relevance > 0].sum(), -relevance[relevance < 0].sum()
        assert float(row["positive_share"]) == pytest.approx(positive / (positive + negative), rel=1e-5)
        assert float(row["positive_share"]) + float(row["negative_share"]) == pytest.approx(1.0)
        png = np.asarray(Image.open(out / row["heatmap"]).convert("RGB"))
        assert png.shape == (8, 8, 3)
        zero = relevance[0] == 0  # background pixels (x = 0) get exactly zero relevance under alpha-beta
        assert zero.any() and (png[zero] == 255).all()  # bwr's centre is white
    assert sorted(os.listdir(out)) == sorted([f"digit{d}_class{d}.png" for d in range(10)] + [
        ".lock", "run.json", "parts", "relevance", "summary.csv", "summary.json", "summary.parquet"])
    assert os.listdir(out / "relevance") == ["part-00000.npy"] and os.listdir(out / "parts") == ["part-00000.json"]


def test_strokes_carry_the_relevance(tmp_path):
    """Most positive relevance lies on the digit's strokes (bright pixels), not on the background."""
    explanations = lrp_onnx.explain_images(lrp_onnx.Explainer(CNN), SAMPLES)
    for e in explanations:
        image, r = e.sample.array[0], e.relevance[0]
        assert r[image > 0.25].clip(min=0).sum() > 0.9 * r.clip(min=0).sum()


def test_top_k_and_named_targets(tmp_path):
    out = tmp_path / "top"
    assert cli("explain", CNN, os.path.join(SAMPLES, "digit3.png"), "-o", out, "--top-k", "3").returncode == 0
    rows = read_summary(out)
    assert len(rows) == 3 and rows[0]["target"] == "3" and len({r["target"] for r in rows}) == 3
    logits = [float(r["logit"]) for r in rows]
    assert logits == sorted(logits, reverse=True)
    out = tmp_path / "named"
    assert cli("explain", CNN, SAMPLES, "-o", out, "--labels", LABELS, "--target", "7").returncode == 0
    assert {r["target_label"] for r in read_summary(out)} == {"7"}


def test_zoom_overlay_and_colormaps(tmp_path):
    out = tmp_path / "zoom"
    assert cli("explain", CNN, os.path.join(SAMPLES, "digit0.png"), "-o", out, "--zoom", "4", "--overlay",
               "--cmap", "coldnhot").returncode == 0
    assert Image.open(out / "digit0_class0.png").size == (32, 32)
    for name in COLORMAPS:
        centre = colormap(np.array([0.5]), name)[0]
        image = np.asarray(lrp_onnx.heatmap(np.zeros((1, 4, 4)), cmap=name))
        assert (image == centre).all()
    assert tuple(colormap(np.array([0.5]), "coldnhot")[0]) == (0, 0, 0)
    assert tuple(colormap(np.array([0.5]), "bwr")[0]) == (255, 255, 255)


def test_mlp_from_skl2onnx_with_npz_arrays(tmp_path):
    features = np.load(os.path.join(ROOT, "models", "digits_samples.npy")).reshape(10, 64)
    np.savez(tmp_path / "flat.npz", first=features[:4], rest=features[4:])
    out = tmp_path / "mlp"
    result = cli("explain", MLP, tmp_path / "flat.npz", "-o", out, "--composite", "epsilon")
    assert result.returncode == 0, result.stderr
    rows = read_summary(out)
    assert [r["input"] for r in rows][:2] == ["flat_first_0", "flat_first_1"] and len(rows) == 10
    assert [int(r["predicted"]) for r in rows] == list(range(10))
    assert Image.open(out / rows[0]["heatmap"]).size == (64, 1)


def test_images_are_resized_with_size(tmp_path):
    big = tmp_path / "big.png"
    Image.open(os.path.join(SAMPLES, "digit5.png")).resize((40, 32), Image.NEAREST).save(big)
    assert_bad_input(cli("explain", CNN, big, "-o", tmp_path / "no", "--fail-fast"), "32x40", "--size")
    assert not (tmp_path / "no").exists()
    result = cli("explain", CNN, big, "-o", tmp_path / "yes", "--size", "8")
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path / "yes")[0]["predicted"] == "5"


def _pickled_npy():
    import io
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _bad_labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("a\nb\nc\n")
    return str(path)


def _bad(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _wrong_size_png(tmp_path):
    Image.open(os.path.join(SAMPLES, "digit5.png")).resize((12, 12)).save(tmp_path / "big.png")
    return tmp_path / "big.png"


# Inputs that cannot be explained: an error row each, the others explained, exit 8; or, with
# --fail-fast, a one-line error (exit 2) at the first.
BAD_INPUTS = {
    "corrupt image": (lambda t: _bad(t, "broken.png", b"\x89PNG\r\n\x1a\nbroken"), "unreadable or corrupt image"),
    "wrong channels": (lambda t: np.save(t / "rgb.npy", np.zeros((2, 3, 8, 8), np.float32)) or t / "rgb.npy",
                       "wrong number of channels: 3"),
    "pickled array": (lambda t: _bad(t, "pickled.npy", _pickled_npy()), "pickled"),
    "image of another size": (_wrong_size_png, "image is 12x12 (HxW) but the model takes 8x8"),
    "NaN values": (lambda t: np.save(t / "nan.npy", np.full((1, 8, 8), np.nan, np.float32)) or t / "nan.npy",
                   "64 NaN or infinite value(s)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_an_input_that_cannot_be_explained_is_an_error_row(tmp_path, case):
    make, phrase = BAD_INPUTS[case]
    bad, out = make(tmp_path), tmp_path / "out"
    result = cli("explain", CNN, os.path.join(SAMPLES, "digit3.png"), bad, os.path.join(SAMPLES, "digit4.png"),
                 "-o", out)
    assert result.returncode == 8, result.stderr
    assert "1 input(s) could not be explained" in result.stderr
    rows = read_summary(out)
    assert [r["predicted"] for r in rows] == ["3", "", "4"]
    assert phrase in rows[1]["error"] and rows[1]["source"].startswith(str(bad)) and rows[1]["relevance_shard"] == ""
    assert np.load(out / rows[2]["relevance_shard"]).shape == (2, 1, 8, 8)  # a row per explained input


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_fail_fast_stops_at_the_first_bad_input_with_nothing_written(tmp_path, case):
    make, phrase = BAD_INPUTS[case]
    out = tmp_path / "out"
    assert_bad_input(cli("explain", CNN, make(tmp_path), SAMPLES, "-o", out, "--fail-fast"), phrase)
    assert not out.exists()


@pytest.mark.parametrize("make,args,phrase", [
    (lambda t: SAMPLES, ["--target", "10"], "target 10 is out of range"),
    (lambda t: SAMPLES, ["--target", "seven", "--labels", LABELS], "'seven' is not a class index"),
    (lambda t: SAMPLES, ["--labels", _bad_labels], "3 labels but the model has 10 classes"),
    (lambda t: SAMPLES, ["--size", "16"], "does not match the model's fixed input size"),
    (lambda t: SAMPLES, ["--mean", "0.1,0.2"], "--mean has 2 values"),
    (lambda t: t / "missing.png", [], "no such file"),
    (lambda t: SAMPLES, ["--workers", "2"], "--workers apply to --engine ray only"),
    (lambda t: SAMPLES, ["--engine", "ray", "--overlay"], "--overlay is not available with --engine ray"),
])
def test_bad_arguments_stop_before_anything_is_written(tmp_path, make, args, phrase):
    args = [a(tmp_path) if callable(a) else a for a in args]
    out = tmp_path / "out"
    assert_bad_input(cli("explain", CNN, make(tmp_path), "-o", out, *args), phrase)
    assert not out.exists()


def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_bad_input(cli("explain", CNN, SAMPLES, "-o", blocker / "out"), "cannot write the output folder", code=6)


def test_rule_flags_with_an_explainer_graph_are_refused(tmp_path):
    path = tmp_path / "digits.lrp.onnx"
    lrp_onnx.save_model(lrp_onnx.convert(CNN), str(path))
    assert cli("explain", path, SAMPLES, "-o", tmp_path / "ok").returncode == 0
    assert_bad_input(cli("explain", path, SAMPLES, "-o", tmp_path / "no", "--composite", "epsilon"),
                     "already an explainer graph")


def test_pickle_is_never_loaded(tmp_path):
    """The refusal happens before unpickling: a payload that would write a file never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    with open(tmp_path / "evil.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([Payload()], dtype=object), allow_pickle=True)
    assert_bad_input(cli("explain", CNN, tmp_path / "evil.npy", "-o", tmp_path / "out", "--fail-fast"), "pickled")
    assert not marker.exists()


def test_provider_flag(tmp_path):
    import onnxruntime as ort
    assert cli("explain", CNN, SAMPLES, "-o", tmp_path / "cpu", "--provider", "cpu").returncode == 0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert_bad_input(cli("explain", CNN, SAMPLES, "-o", tmp_path / "gpu", "--provider", "cuda"),
                         "no CUDAExecutionProvider")


@pytest.mark.parametrize("flags", [["--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3"], ["--scale", "255"],
                                   ["--grayscale", "--mean", "0.45", "--std", "0.25"]],
                         ids=["mean-std", "scale", "grayscale"])
def test_rgb_images_are_preprocessed_as_a_numpy_re_derivation_says(tmp_path, flags):
    """RGB PNGs through explain's image pipeline on the bundled RGB model: center crop (64×80 to 64×64,
    no interpolation), grey as Pillow's ITU-R 601 luma repeated over the three channels, [0, 1] or
    0..255, minus the mean, divided by the std, NCHW. The relevance the CLI writes must be the
    explainer's on the array this numpy re-derivation makes."""
    model = os.path.join(ROOT, "models", "shapes_cnn.onnx")
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    result = cli("explain", model, tmp_path / "img0.png", tmp_path / "img1.png", "--size", "64", *flags,
                 "--no-heatmaps", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    value = dict(zip(flags[::2], flags[1::2])) if "--grayscale" not in flags else dict(zip(flags[1::2], flags[2::2]))
    x = pixels[:, :, 8:72].astype(np.float64)  # the center 64 of 80 columns
    if "--grayscale" in flags:
        luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536  # Pillow's convert("L")
        x = np.repeat(luma[..., None], 3, axis=3)
    x = x / 255 * float(value.get("--scale", 1))
    x = (x - np.array(value.get("--mean", "0").split(","), float)) / np.array(value.get("--std", "1").split(","), float)
    expected_input = x.transpose(0, 3, 1, 2).astype(np.float32)
    _, expected = lrp_onnx.Explainer(model).explain(expected_input)
    written = np.load(tmp_path / "out" / "relevance" / "part-00000.npy")
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_layout_nhwc_is_read_as_the_flag_says(tmp_path):
    """An NHWC model whose input [N, 3, 8, 3] could be either layout: `--layout nhwc` makes a 3×8 RGB
    image height 3, width 8, channels last, and its relevance is the explainer's on that array."""
    rng = np.random.default_rng(12)
    initializers = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "v")]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "v"], ["logits"])]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 3])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])]
    graph = helper.make_graph(nodes, "nhwc", inputs, outputs, initializers)
    model = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    pixels = rng.integers(0, 256, (3, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    result = cli("explain", model, tmp_path / "wide.png", "--layout", "nhwc", "--no-heatmaps", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    _, expected = lrp_onnx.Explainer(str(model)).explain((pixels / 255).astype(np.float32)[None])
    np.testing.assert_allclose(np.load(tmp_path / "out" / "relevance" / "part-00000.npy"), expected, rtol=1e-5,
                               atol=1e-7)
    refused = cli("explain", model, tmp_path / "wide.png", "--layout", "nchw", "--no-heatmaps", "-o", tmp_path / "o2")
    assert refused.returncode == 8 and "image is 3x8 (HxW) but the model takes 8x3" in refused.stderr

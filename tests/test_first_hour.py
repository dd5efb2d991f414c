"""The first hour with lrp-onnx (issue 30): each finding of a new user's first session, as a test
that failed before it was fixed. The command line runs as users run it, in a subprocess."""

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from test_cli import assert_bad_input, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits_cnn.onnx")


def long_chain(path, links=1500):
    """An MLP whose `inspect` listing (a line per node) is larger than a pipe's buffer (64 KiB)."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h0"], name="dense")]
    nodes += [helper.make_node("Relu", [f"h{i}"], [f"h{i + 1}"], name=f"relu_{i}") for i in range(links)]
    nodes.append(helper.make_node("Gemm", [f"h{links}", "w", "b"], ["logits"], name="head"))
    weights = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
               numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], weights)
    import onnx
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """`lrp-onnx inspect MODEL | head -1`: the reader leaves after one line, the rest cannot be
    written, and that is what the user asked for: exit 0, nothing on stderr."""
    model = long_chain(str(tmp_path / "chain.onnx"))
    process = subprocess.Popen([sys.executable, "-m", "lrp_onnx", "inspect", model], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()  # the output is larger than the pipe's buffer: the writer is still writing
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "chain.onnx" in first and stderr == ""


def test_version_bare_invocation_and_python_dash_m():
    version = importlib.metadata.version("lrp-onnx")
    result = subprocess.run([sys.executable, "-m", "lrp_onnx", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"lrp-onnx {version}"
    bare = subprocess.run([sys.executable, "-m", "lrp_onnx"], capture_output=True, text=True)
    assert bare.returncode == 0 and bare.stdout.startswith("usage: lrp-onnx") and bare.stderr == ""
    for command in ("convert", "inspect", "explain", "evaluate", "compare", "check", "export-triton"):
        assert command in bare.stdout
    assert os.path.exists(os.path.join(os.path.dirname(lrp_onnx.__file__), "py.typed"))


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_goes_before_or_after_the_command(tmp_path, where):
    """--debug shows the traceback wherever it stands."""
    missing = str(tmp_path / "missing.onnx")
    args = ["--debug", "inspect", missing] if where == "before" else ["inspect", missing, "--debug"]
    result = cli(*args)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert_bad_input(cli("inspect", missing), "missing.onnx", code=3)


@pytest.mark.parametrize("name", ["epsilon-plus-flat", "epsilon_plus_flat", "EpsilonPlusFlat"])
def test_zennits_composite_names_are_accepted(name):
    result = cli("inspect", DIGITS, "--composite", name)
    assert result.returncode == 0, result.stderr
    assert "composite epsilon-plus-flat" in result.stdout.splitlines()[0]
    assert lrp_onnx.make_composite(name).name == "epsilon-plus-flat"


def test_an_unknown_composite_lists_the_known_ones():
    result = cli("inspect", DIGITS, "--composite", "EpsilonPlusFlatt")
    assert result.returncode == 2 and "known composites: auto, alpha-beta, epsilon" in result.stderr


@pytest.mark.parametrize("target", ["-1", "predicted"])
def test_target_minus_one_is_the_predicted_class(tmp_path, target):
    """As in the graph and the Python API."""
    samples = os.path.join(ROOT, "models", "samples")
    out = tmp_path / "out"
    result = cli("explain", DIGITS, samples, "-o", out, "--target", target, "--no-heatmaps", "--json")
    assert result.returncode == 0, result.stderr
    import json
    rows = json.load(open(out / "summary.json"))
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows and all(row["target"] == row["predicted"] for row in rows)


def test_runtime_flags_leave_the_model_alone(tmp_path):
    """`check --runtime ort-unoptimised X.lrp.onnx` read the model as a second runtime name: one
    runtime (or a comma-separated list) per flag."""
    out = str(tmp_path / "digits.lrp.onnx")
    assert cli("convert", DIGITS, "-o", out).returncode == 0
    result = cli("check", "--runtime", "ort-unoptimised", out)
    assert result.returncode == 0, result.stderr
    assert_bad_input(cli("check", out, "--runtime", "ort-unoptimised,tensorrtt"), "unknown runtime tensorrtt")


def test_an_invalid_target_cannot_pass_for_an_explanation_in_plain_onnx_runtime():
    """The graph contract: a target other than -1 or a class index gives explained_class -1 and NaN
    relevance and logit, where OneHot alone gives an all-zero relevance (a target past the classes)
    or another class's (a target below -1 wraps around). The valid samples of the batch are untouched."""
    explainer = lrp_onnx.convert(DIGITS)
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    targets = np.array([-1, 3, 10, -2, 12])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"image": x, "target": targets})))
    valid = np.array([True, True, False, False, False])
    assert out["explained_class"][~valid].tolist() == [-1, -1, -1]
    assert out["explained_class"][1] == 3 and out["explained_class"][0] == out["logits"][0].argmax()
    assert np.isnan(out["explained_logit"][~valid]).all() and np.isfinite(out["explained_logit"][valid]).all()
    assert np.isnan(out["relevance"][~valid]).all() and np.isfinite(out["relevance"][valid]).all()
    alone = dict(zip(names, session.run(None, {"image": x[:2], "target": targets[:2]})))
    np.testing.assert_array_equal(alone["relevance"], out["relevance"][:2])


def test_zero_bias_conserves_relevance_down_to_the_first_layer_only():
    """The documented --zero-bias claim (docs/reference/commands.md), as it holds: with biases out of the rules, Σ R equals the
    logit at every layer's output, and at the input except for what reaches units that are active
    through their bias alone. Such a unit (an all-zero receptive field on the digits' background)
    has a bias-free pre-activation of 0, so its relevance can go to no input: numpy finds those
    units, and the input's Σ R is the first layer's without their share."""
    import glob

    import onnx
    from PIL import Image

    import numpy_reference as ref
    files = sorted(glob.glob(os.path.join(ROOT, "models", "samples", "*.png")))
    x = np.stack([np.asarray(Image.open(f).convert("L"), np.float32)[None] / 255 for f in files])
    first = "/0/Conv_output_0"
    explainer = lrp_onnx.convert(DIGITS, "epsilon", zero_params=["bias"], epsilon=1e-9, layers=[first])
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"image": x, "target": np.full(len(x), -1)})))
    at_first = out["relevance:" + first]
    np.testing.assert_allclose(at_first.reshape(len(x), -1).sum(1), out["explained_logit"], rtol=1e-5)
    model = onnx.load(DIGITS)
    conv = model.graph.node[0]
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    bias_free = np.stack([ref.conv(sample, weight, pads=[1, 1, 1, 1]) for sample in x])
    takeable = (at_first * (bias_free != 0)).reshape(len(x), -1).sum(1)
    at_input = out["relevance"].reshape(len(x), -1).sum(1)
    np.testing.assert_allclose(at_input, takeable, rtol=1e-4)
    ratios = at_input / out["explained_logit"]
    assert np.abs(ratios - 1).max() > 0.1  # not conserved at the input: the docs say so


def test_why_an_input_failed_is_printed_not_only_written(tmp_path):
    """The first few errors in full on stderr, then a count; every error is still in summary.csv."""
    from PIL import Image
    images = []
    for i in range(5):
        images.append(tmp_path / f"big{i}.png")
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(images[-1])
    result = cli("explain", DIGITS, *images, os.path.join(ROOT, "models", "samples", "digit1.png"),
                 "-o", tmp_path / "out", "--no-heatmaps")
    assert result.returncode == 8
    errors = [line for line in result.stderr.splitlines() if line.startswith("lrp-onnx: error: ")]
    assert len(errors) == 3 and all("image is 28x28 (HxW) but the model takes 8x8; pass --size" in e for e in errors)
    assert str(images[0]) in errors[0]
    assert "5 input(s) could not be explained (2 more not shown)" in result.stderr


def test_a_second_explain_with_other_settings_gets_its_own_folder(tmp_path):
    """After the quick start, another model or composite works without flags; the same command
    again continues its own run; nothing is deleted."""
    samples = os.path.join(ROOT, "models", "samples")
    vit = os.path.join(ROOT, "models", "digits_vit.onnx")
    runs = [(DIGITS,), (vit,), (DIGITS, "--composite", "epsilon"), (DIGITS,)]
    results = [cli("explain", *run[:1], samples, "--no-heatmaps", *run[1:], cwd=tmp_path) for run in runs]
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    folders = [r.stdout.split(" in ")[-1].split("/ (")[0] for r in results]
    assert len(set(folders[:3])) == 3 and folders[3] == folders[0]
    assert all(f.startswith("lrp-out/digits_") for f in folders)
    assert "10 of them done by the run this one continued" in results[3].stdout
    for folder in set(folders):
        assert (tmp_path / folder / "summary.csv").read_text().count("\n") == 11


def test_the_python_api_answers_as_python_does():
    """A keyword that is no model input is a TypeError naming it; a missing model input is named;
    labels may be a list or a file; Explanation and TextExplanation share as_dict and have short reprs."""
    explainer = lrp_onnx.Explainer(DIGITS)
    x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_k'.*\\['image'\\]"):
        explainer.explain(x, top_k=2)
    labels_file = os.path.join(ROOT, "models", "digits_labels.txt")
    image = os.path.join(ROOT, "models", "samples", "digit1.png")
    from_file = lrp_onnx.explain_images(explainer, [image], target=3, labels=labels_file)
    from_list = lrp_onnx.explain_images(explainer, [image], target=3, labels=open(labels_file).read().split())
    assert from_file[0].as_dict() == from_list[0].as_dict() == from_file[0].summary()
    assert from_file[0].as_dict()["target_label"] == open(labels_file).read().split()[3]
    assert len(repr(from_file[0])) < 200 and "digit1" in repr(from_file[0])
    bert = lrp_onnx.Explainer(os.path.join(ROOT, "models", "sentiment_bert.onnx"), composite="attnlrp")
    with pytest.raises(lrp_onnx.InputError, match="the model also takes \\['attention_mask'\\]"):
        bert.explain(np.array([[101, 2000, 102]]))


@pytest.mark.parametrize("model,composite", [("digits_vit", "attnlrp"), ("sentiment_bert", "attnlrp"),
                                             ("digits_cnn", "alpha-beta")])
def test_the_default_composite_fits_the_model(model, composite):
    """auto: AttnLRP where the graph has attention, the seed paper's alpha-beta otherwise; inspect
    says which and why, and the explainer's metadata records the composite chosen."""
    path = os.path.join(ROOT, "models", f"{model}.onnx")
    first = cli("inspect", path).stdout.splitlines()[0]
    assert f"composite {composite} (auto: " in first
    assert ("multiplies two activations" in first) == (composite == "attnlrp")
    assert lrp_onnx.emit.read_metadata(lrp_onnx.convert(path))["composite"] == composite


def test_evaluate_takes_a_composite_and_its_defaults_fit_the_model(tmp_path):
    """On the bundled ViT the default LRP methods are attnlrp and cp-lrp, and attnlrp beats random
    (with the CNN composites it fell below: EVALUATION.md)."""
    samples = os.path.join(ROOT, "models", "samples")
    vit = os.path.join(ROOT, "models", "digits_vit.onnx")
    result = cli("evaluate", vit, samples, "--steps", "10", "-o", tmp_path / "auto")
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| lrp:")}
    assert list(rows) == ["lrp:attnlrp", "lrp:cp-lrp"]
    assert float(rows["lrp:attnlrp"].split("|")[3].split("±")[0]) > 0
    chosen = cli("evaluate", vit, samples, "--steps", "2", "--composite", "epsilon", "--method", "lrp",
                 "-o", tmp_path / "named")
    assert chosen.returncode == 0 and "| lrp:epsilon |" in chosen.stdout, chosen.stderr


def test_check_takes_its_values_as_data_and_input_still_works_with_a_note(tmp_path):
    """--input names a graph input in convert, inspect and explain; check's array is --data."""
    out = str(tmp_path / "digits.lrp.onnx")
    assert cli("convert", DIGITS, "-o", out).returncode == 0
    samples = os.path.join(ROOT, "models", "digits_samples.npy")
    new = cli("check", out, "--runtime", "ort-unoptimised", "--data", samples)
    old = cli("check", out, "--runtime", "ort-unoptimised", "--input", samples)
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    assert new.stderr == "" and "check --input is deprecated: use --data" in old.stderr


def test_every_commands_help_ends_in_an_example_that_runs(tmp_path):
    """The examples use the bundled models; run in order (check reads what convert wrote)."""
    from lrp_onnx.cli import EXAMPLES
    models = os.path.join(ROOT, "models")
    for command, example in EXAMPLES.items():
        help_text = cli(command, "--help").stdout
        assert help_text.rstrip().endswith(example), command
        args = [a.replace("models/", models + "/", 1) if a.startswith("models/") else a for a in example.split()[1:]]
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 0, (example, result.stderr)


def test_compare_prints_a_table_not_python_lists(tmp_path):
    samples = os.path.join(ROOT, "models", "samples")
    vit = os.path.join(ROOT, "models", "digits_vit.onnx")
    result = cli("compare", DIGITS, vit, samples, "--aopc-steps", "3", "-o", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    assert "[" not in result.stdout and "| measure | A | B | A and B |" in result.stdout
    assert "(alpha-beta)" in result.stdout and "(attnlrp)" in result.stdout  # each model's own auto choice
    import json
    mean = json.load(open(tmp_path / "c" / "compare.json"))["mean"]
    assert f"| relevance Pearson (mean over inputs) | | | {mean['pearson']:.3f} |" in result.stdout


def test_explain_prints_the_predictions_and_quiet_prints_nothing(tmp_path):
    """The first rows of summary.csv on stdout (each input's prediction and the class explained);
    with --quiet nothing but errors, before or after the command."""
    import csv
    samples = os.path.join(ROOT, "models", "samples")
    result = cli("explain", DIGITS, samples, "--top-k", "2", "-o", tmp_path / "o", "--no-heatmaps")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "o" / "summary.csv")))
    shown = [line.split() for line in result.stdout.splitlines() if line.startswith("  digit")]
    assert len(shown) == 10 and len(rows) == 20
    for words, row in zip(shown, rows):
        assert words[0] == row["input"] and words[2] == row["predicted"] + "," and words[4] == row["target"] + ":"
    for args in (("--quiet", "explain"), ("explain", "-q")):
        quiet = cli(*args, DIGITS, samples, "-o", tmp_path / "q", "--no-heatmaps")
        assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr


def test_explain_images_takes_paths_pil_images_and_arrays():
    """Paths, PIL images and arrays in one list, explained in their order: a PIL image is preprocessed
    as its file is (grey, [0, 1]: the numpy re-derivation below), an array is model-ready, a batch
    array is one input per row."""
    from PIL import Image

    explainer = lrp_onnx.Explainer(DIGITS)
    path = os.path.join(ROOT, "models", "samples", "digit3.png")
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)[None] / 255  # [1, 8, 8] in [0, 1]
    rgb = Image.open(path).convert("RGB")  # converted to grey for the one-channel model, as a file would be
    batch = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))[[3, 7]]
    found = lrp_onnx.explain_images(explainer, [path, rgb, pixels, batch], target=3)
    assert [e.sample.name for e in found] == ["digit3", "image1", "array2", "array3_0", "array3_1"]
    for e in found[1:3]:
        np.testing.assert_array_equal(e.relevance, found[0].relevance)
    _, expected = explainer.explain(batch, target=3)
    np.testing.assert_array_equal(np.stack([e.relevance for e in found[3:]]), expected)
    (alone,) = lrp_onnx.explain_images(explainer, pixels)  # a bare array is one input
    assert alone.sample.name == "array0"
    with pytest.raises(lrp_onnx.InputError, match=r"<image 0>: image is 28x28 \(HxW\) but the model takes 8x8"):
        lrp_onnx.explain_images(explainer, Image.new("L", (28, 28)))
    with pytest.raises(lrp_onnx.InputError, match=r"<array 0>: wrong number of channels: 3"):
        lrp_onnx.explain_images(explainer, np.zeros((2, 3, 8, 8), np.float32))


def test_heatmap_takes_the_batch_explain_returns():
    """explain returns relevance [N, C, H, W]: heatmap gives one image per sample, each the image
    of that sample alone."""
    explainer = lrp_onnx.Explainer(DIGITS)
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    _, relevance = explainer.explain(x)
    images = lrp_onnx.heatmap(relevance)
    assert len(images) == 3
    for image, r in zip(images, relevance):
        assert np.array_equal(np.asarray(image), np.asarray(lrp_onnx.heatmap(r)))


def test_verbose_says_how_long_each_step_took(tmp_path):
    result = cli("explain", DIGITS, os.path.join(ROOT, "models", "samples"), "-o", tmp_path / "v", "--no-heatmaps",
                 "--verbose")
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stderr.splitlines() if line.startswith("lrp-onnx: ") and line.endswith(" s")]
    assert [line.rsplit(" in ", 1)[0] for line in steps] == [
        "lrp-onnx: read the model (converted in memory if a classifier) and started ONNX Runtime",
        "lrp-onnx: explained the inputs"]
    converted = cli("-v", "convert", DIGITS, "-o", tmp_path / "d.lrp.onnx")
    assert converted.returncode == 0 and "lrp-onnx: converted the model in " in converted.stderr

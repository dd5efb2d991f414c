"""The lrp-onnx command line, run as a real subprocess: conversion, inspect, and every bad-input case
(one-line error, the exit code of its error class, no traceback, no output file, the input never touched)."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lrp_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_bad_input(result, *phrases, code=2):
    """One line on stderr holding every phrase; ``code`` is the error class's exit code (cli.EXIT_CODES)."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrp-onnx: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def only_files(directory):
    return sorted(os.listdir(directory))


@pytest.fixture
def model(tmp_path, cnn_path):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(open(cnn_path, "rb").read())
    return path


def test_convert_writes_a_checked_explainer_beside_the_model(model, images):
    before = model.read_bytes()
    result = cli("convert", model, "--composite", "epsilon-gamma-box", "--low", "-3", "--high", "3")
    assert result.returncode == 0, result.stderr
    out = model.parent / "cnn.lrp.onnx"
    assert f"wrote {out}" in result.stdout
    assert model.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    _, from_file = lrp_onnx.Explainer(str(out)).explain(images, 1)
    _, in_memory = lrp_onnx.Explainer(str(model), composite="epsilon-gamma-box", low=-3, high=3).explain(images, 1)
    np.testing.assert_array_equal(from_file, in_memory)
    assert only_files(model.parent) == ["cnn.lrp.onnx", "cnn.onnx"]


def test_layer_relevance_and_zero_bias_flags(model, images):
    layer = lrp_onnx.plan(str(model)).units[1].outputs[0].name  # the first Relu's output
    out = model.parent / "layers.onnx"
    result = cli("convert", model, "-o", out, "--composite", "zplus", "--zero-bias", "--layer", layer,
                 "--layer-sum", "channel")
    assert result.returncode == 0, result.stderr
    named = lrp_onnx.Explainer(str(out)).run(images)
    per_channel = named["relevance:" + layer]
    assert per_channel.shape == (3, 6)
    # zplus without biases conserves: the Relu's channels hold what the input holds
    np.testing.assert_allclose(per_channel.sum(1), named["relevance"].reshape(3, -1).sum(1), rtol=1e-4, atol=1e-6)
    assert_bad_input(cli("convert", model, "-o", model.parent / "x.onnx", "--layer", "nope"), "layer 'nope'")


def test_method_flag(model, images):
    out = model.parent / "gxi.onnx"
    result = cli("convert", model, "-o", out, "--method", "gradient-x-input")
    assert result.returncode == 0, result.stderr
    _, from_file = lrp_onnx.Explainer(str(out)).explain(images, 1)
    _, gradient = lrp_onnx.Explainer(str(model), method="gradient").explain(images, 1)
    np.testing.assert_allclose(from_file, gradient * images, rtol=1e-5, atol=1e-7)
    assert "gradient" in cli("inspect", model, "--method", "gradient").stdout
    assert_bad_input(cli("convert", model, "-o", model.parent / "x.onnx", "--method", "gradient", "--epsilon", "1"),
                     "has no rules")


def test_the_checkout_shim_runs_the_same_cli(model):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "convert", str(model), "-o",
                             str(model.parent / "shim.onnx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (model.parent / "shim.onnx").exists()


def test_existing_output_needs_force(model):
    out = model.parent / "out.onnx"
    out.write_bytes(b"keep me")
    assert_bad_input(cli("convert", model, "-o", out), "exists", "--force", code=6)
    assert out.read_bytes() == b"keep me"
    assert cli("convert", model, "-o", out, "--force").returncode == 0
    onnx.checker.check_model(onnx.load(str(out)))


def test_never_overwrites_the_input(model):
    before = model.read_bytes()
    assert_bad_input(cli("convert", model, "-o", model, "--force"), "refusing to overwrite the input", code=6)
    assert model.read_bytes() == before


def test_convert_writes_only_its_output(model, tmp_path):
    """Nothing in the working directory (no shape-inference scratch file), nothing beside the
    input, no temporary file left beside the output."""
    work, out_dir = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    out_dir.mkdir()
    before = {p: p.read_bytes() for p in model.parent.iterdir() if p.is_file()}
    assert cli("convert", model, "-o", out_dir / "explainer.onnx", cwd=work).returncode == 0
    assert only_files(work) == [] and only_files(out_dir) == ["explainer.onnx"]
    assert {p: p.read_bytes() for p in model.parent.iterdir() if p.is_file()} == before


def test_output_folder_must_exist(model, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a folder")
    assert_bad_input(cli("convert", model, "-o", blocker / "out.onnx"), "does not exist", code=6)
    assert_bad_input(cli("convert", model, "-o", tmp_path / "missing" / "out.onnx"), "does not exist", code=6)
    assert not (tmp_path / "missing").exists()


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(os.urandom(4096))
    assert_bad_input(cli("convert", path), str(path), code=3)
    assert only_files(tmp_path) == ["notes.onnx"]


def test_truncated(tmp_path, cnn_path):
    data = open(cnn_path, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_bad_input(cli("convert", path), str(path), code=3)
    assert only_files(tmp_path) == ["cut.onnx"]


def test_missing_file(tmp_path):
    assert_bad_input(cli("convert", tmp_path / "nope.onnx"), "no such file", code=3)


def _save(tmp_path, name, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_unsupported_ops_are_all_listed(tmp_path):
    nodes = [helper.make_node("Sin", ["x"], ["s"], name="wobble"), helper.make_node("Cos", ["s"], ["c"], name="wave"),
             helper.make_node("Sin", ["c"], ["s2"], name="wobble2"), helper.make_node("Flatten", ["s2"], ["y"], name="flat")]
    path = _save(tmp_path, "trig", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    assert_bad_input(cli("convert", path), "3 unsupported node(s) (Sin ×2, Cos ×1)", "'wobble' (Sin)", "'wave' (Cos)",
                     "'wobble2' (Sin)", code=5)
    assert only_files(tmp_path) == ["trig.onnx"]
    result = cli("inspect", path)
    assert result.returncode == 5
    assert "UNSUPPORTED" in result.stdout and "wobble (Sin), wave (Cos), wobble2 (Sin)" in result.stdout


def test_no_float_input(tmp_path):
    """A boolean input is no image (an integer one that a Cast turns into floats is: test_preprocessing)."""
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT)]
    path = _save(tmp_path, "bools", nodes, [helper.make_tensor_value_info("x", TensorProto.BOOL, ["N", 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    assert_bad_input(cli("convert", path), "no float input", code=5)


def test_output_that_is_not_a_score_tensor(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path = _save(tmp_path, "image", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    assert_bad_input(cli("convert", path), "'y'", "[N, classes]", code=5)


@pytest.mark.parametrize("flags,phrase", [
    (["--alpha", "3", "--beta", "1"], "alpha - beta = 1"),
    (["--alpha", "0.5", "--beta", "-0.5"], "alpha, beta >= 0"),
    (["--composite", "epsilon-gamma-box", "--gamma", "-1"], "gamma must be"),
    (["--composite", "epsilon-gamma-box", "--low", "1", "--high", "0"], "low <= high"),
    (["--composite", "epsilon", "--epsilon", "nan"], "epsilon must be"),
    (["--composite", "epsilon", "--alpha", "2"], "does not use alpha"),
    (["--stabilizer", "-1"], "stabilizer must be"),
])
def test_rule_parameters_that_break_constraints(model, flags, phrase):
    assert_bad_input(cli("convert", model, *flags), phrase)
    assert only_files(model.parent) == ["cnn.onnx"]


def test_rules_file_overrides_the_composite(model, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"Gemm": {"rule": "epsilon", "epsilon": 0.5}, "/0/Conv*": "flat"}))
    result = cli("inspect", model, "--rules", rules)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "flat" in rows["/0/Conv"] and "epsilon(epsilon=0.5)" in rows["/8/Gemm"]
    assert "alpha-beta" in rows["/4/Conv"] and "pass" in rows["/2/Relu"] and "route" in rows["/3/MaxPool"]
    toml = tmp_path / "rules.toml"
    toml.write_text('Gemm = { rule = "epsilon", epsilon = 0.5 }\n"/0/Conv*" = "flat"\n')
    assert cli("inspect", model, "--rules", toml).stdout == result.stdout.replace(str(rules), str(toml))


@pytest.mark.parametrize("content,phrase", [('{"Conv": "nonsense"}', "unknown rule 'nonsense'"),
                                            ('{"Conv": {"rule": "gamma", "gama": 1}}', "unknown: ['gama']"),
                                            ('{"NoSuchNode*": "flat"}', "matches no explained node"),
                                            ("{not json", "not valid JSON")])
def test_bad_rules_file(model, tmp_path, content, phrase):
    rules = tmp_path / "rules.json"
    rules.write_text(content)
    assert_bad_input(cli("convert", model, "--rules", rules), phrase)


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00junk")
    result = cli("convert", path, "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr

"""Explainers on runtimes other than ONNX Runtime's Python CPU build, against it: OpenVINO's CPU
plug-in (with its f32 precision hint: its default on this CPU is bf16), ONNX Runtime Node, and
ONNX Runtime Web (WASM) in headless Chromium, through ``lrp_onnx.runtimes`` and ``lrp-onnx check``.

The JavaScript runtimes need Node.js, ``npm ci`` in the checkout and Debian's chromium; .ci/run
installs them, so in CI (CI set) a missing one fails instead of skipping."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import exporters
from conftest import extra_module
import lrp_onnx
from lrp_onnx import runtimes
from lrp_onnx.cli import main

extra_module("openvino")
TOLERANCE = 1e-5  # relative L2 of the relevance against ONNX Runtime
FLIPPED_TOLERANCE = 1e-3  # where max-pool windows picked another winner (see test_every_runtime_matches_ort)
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
OTHER_RUNTIMES = ["openvino", "ort-node", "ort-web"]


def _javascript_missing():
    try:
        runtimes.node_root("ort-web")
        runtimes.node_root("ort-node")
    except lrp_onnx.InputError as e:
        return str(e)
    import shutil
    return None if shutil.which("node") and shutil.which("chromium") else "node or chromium is not installed"


needs_javascript = pytest.mark.skipif(bool(_javascript_missing()) and not os.environ.get("CI"),
                                      reason=str(_javascript_missing()))


def square_mlp():
    """Square weights: OpenVINO shared one repacked weight between a Gemm and its transposed use
    (opposite transB) and silently computed the wrong product, error about 1.4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def on_openvino(path, feeds):
    return runtimes.run_openvino(str(path), feeds, repeats=0).outputs["relevance"]


def explainer_file(model_path, composite, folder):
    path = folder / f"explainer-{composite}.onnx"
    lrp_onnx.save_model(lrp_onnx.convert(str(model_path), composite), str(path))
    return path


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_openvino_matches_ort_on_square_dense_layers(tmp_path, exporter, composite):
    x = torch.rand(4, 1, 4, 8)
    exporters.export_torch(square_mlp(), x, str(tmp_path / "mlp.onnx"), exporter)
    path = explainer_file(tmp_path / "mlp.onnx", composite, tmp_path)
    feeds = {"x": x.numpy(), "target": np.full(4, -1, np.int64)}
    expected = lrp_onnx.Explainer(str(path)).run(feeds["x"])["relevance"]
    assert runtimes.relative_l2(on_openvino(path, feeds), expected) <= TOLERANCE


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
def test_openvino_matches_ort_on_the_digits_cnn(tmp_path, composite):
    images = np.load(os.path.join(MODELS, "digits_samples.npy"))
    path = explainer_file(os.path.join(MODELS, "digits_cnn.onnx"), composite, tmp_path)
    expected = lrp_onnx.Explainer(str(path)).run(images)["relevance"]
    feeds = {"image": images, "target": np.full(len(images), -1, np.int64)}
    assert runtimes.relative_l2(on_openvino(path, feeds), expected) <= TOLERANCE


def test_openvino_matches_ort_on_a_tiny_bert(tmp_path):
    """Square MatMul weights in every attention projection, token ids, a padded sequence."""
    feeds = exporters.hf_text_classifier("bert", str(tmp_path / "bert.onnx"))
    path = explainer_file(tmp_path / "bert.onnx", "attnlrp", tmp_path)
    expected = lrp_onnx.Explainer(str(path)).run(feeds)["relevance"]
    assert runtimes.relative_l2(on_openvino(path, {**feeds, "target": np.full(2, -1, np.int64)}), expected) <= TOLERANCE


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat", "epsilon-gamma-box"])
def test_explainers_are_portable_by_default(tmp_path, composite):
    """No empty optional input (OpenVINO refused alpha-beta's Gemm(x, W⁺, "") with "NullNode with
    dynamic rank"), and OneHot's depth a constant where the class count is static (TensorRT
    needs it at build time)."""
    exporters.export_torch(square_mlp(), torch.rand(2, 1, 4, 8), str(tmp_path / "mlp.onnx"), "dynamo")
    proto = lrp_onnx.convert(str(tmp_path / "mlp.onnx"), composite)
    assert not [n.name for n in proto.graph.node if "" in n.input]
    constants = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                            for o in n.output}
    (onehot,) = [n for n in proto.graph.node if n.op_type == "OneHot"]
    assert onehot.input[1] in constants


@needs_javascript
@pytest.mark.parametrize("runtime", OTHER_RUNTIMES)
def test_an_invalid_target_is_flagged_on_every_runtime(runtime, tmp_path):
    """The graph contract on the deploy runtimes as on ONNX Runtime (tests/test_first_hour.py): a target
    past the classes or below -1 gives explained_class -1 and NaN logit and relevance, and the valid
    samples of the batch get what they get alone."""
    path = explainer_file(os.path.join(MODELS, "digits_cnn.onnx"), "alpha-beta", tmp_path)
    images = np.load(os.path.join(MODELS, "digits_samples.npy"))[:4]
    run = {"openvino": runtimes.run_openvino, "ort-node": runtimes.run_ort_node, "ort-web": runtimes.run_ort_web}
    out = run[runtime](str(path), {"image": images, "target": np.array([-1, 10, 3, -2], np.int64)}, repeats=0).outputs
    assert out["explained_class"].tolist() == [0, -1, 3, -1]
    assert np.isnan(out["explained_logit"][[1, 3]]).all() and np.isnan(out["relevance"][[1, 3]]).all()
    alone = run[runtime](str(path), {"image": images[[0, 2]], "target": np.array([-1, 3], np.int64)}, repeats=0).outputs
    np.testing.assert_allclose(out["relevance"][[0, 2]], alone["relevance"], rtol=1e-5, atol=1e-7)


# The matrix: the digits CNN, resnet18 (64 px) and vgg11_bn (224 px, 531 MB: saved with
# external data, which ONNX Runtime Web needs), both exporters, the default composite and the
# epsilon-plus-flat one.
ZOO = [("digits_cnn", None), ("resnet18", "torchscript"), ("resnet18", "dynamo"), ("vgg11_bn", "torchscript"),
       ("vgg11_bn", "dynamo")]


@pytest.fixture(scope="module", params=ZOO, ids=[f"{m}-{e}" if e else m for m, e in ZOO])
def zoo_model(request, tmp_path_factory):
    name, exporter = request.param
    if exporter is None:
        return os.path.join(MODELS, f"{name}.onnx")
    path = str(tmp_path_factory.mktemp(name) / f"{name}-{exporter}.onnx")
    exporters.torchvision_classifier(name, path, exporter)
    return path


@needs_javascript
@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
def test_every_runtime_matches_ort(zoo_model, composite, tmp_path):
    path = str(tmp_path / "explainer.onnx")
    lrp_onnx.save_model(lrp_onnx.convert(zoo_model, composite), path)
    assert os.path.exists(path + ".data") == ("vgg11_bn" in zoo_model)  # past 256 MiB: external data
    reference, results = runtimes.check(path, OTHER_RUNTIMES, repeats=0)
    assert {"relevance", "explained_class"} <= set(reference.outputs)
    for parity in results:
        assert parity.failure is None, parity.failure
        assert set(parity.errors) == set(reference.outputs), parity.runtime
        if parity.errors["relevance"] <= TOLERANCE:
            assert parity.worst <= TOLERANCE, (parity.runtime, parity.errors)
            continue
        # vgg11_bn on OpenVINO and ORT Web: their convolutions round differently (logits 1e-6 to
        # 5e-6 apart) and a few max-pool windows whose largest inputs tie within that pick another
        # winner, which moves that window's relevance (3.4e-5 to 8.4e-5 measured). Accepted only
        # with such flips, logits within the tolerance, and a difference a few windows can make.
        assert parity.winner_flips, (parity.runtime, parity.errors, "a relevance difference with no max-pool flip")
        assert parity.errors["logits"] <= TOLERANCE, (parity.runtime, parity.errors)
        assert parity.errors["relevance"] <= FLIPPED_TOLERANCE, (parity.runtime, parity.errors, parity.winner_flips)


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[2, 2], strides=[2, 2]),
                                   dict(kernel_shape=[3, 2], strides=[2, 1], ceil_mode=1),
                                   dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER")])
def test_window_winners_are_the_first_maximum_of_each_window(attrs):
    """The max-pool flip count's winners against a loop over the windows, on ORT's own MaxPool
    output shape, with ties (integers) that the first maximum must break."""
    import onnx
    import onnxruntime as ort
    x = np.random.default_rng(0).integers(0, 3, (2, 3, 7, 6)).astype(np.float32)
    node = onnx.helper.make_node("MaxPool", ["x"], ["y"], **attrs)
    graph = onnx.helper.make_graph([node], "pool", [onnx.helper.make_tensor_value_info("x", 1, x.shape)],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    winners = runtimes._window_winners(node, x, y.shape)
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    if attrs.get("auto_pad") == "SAME_UPPER":
        top, left = ((y.shape[2] - 1) * sh + kh - 7) // 2, ((y.shape[3] - 1) * sw + kw - 6) // 2
    else:
        top, left = attrs.get("pads", [0, 0])[:2]
    padded = np.full((2, 3, 7 + 2 * kh, 6 + 2 * kw), -np.inf, np.float32)
    padded[:, :, top:top + 7, left:left + 6] = x
    for i, j in np.ndindex(*y.shape[2:]):
        window = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(2, 3, -1)
        assert np.array_equal(window.max(-1), y[:, :, i, j])  # the same windows as MaxPool's
        assert np.array_equal(winners[:, :, i, j], window.argmax(-1))


@needs_javascript
def test_check_reports_each_runtime_and_fails_on_a_mismatch(tmp_path, capsys):
    out = str(tmp_path / "digits.lrp.onnx")
    assert main(["convert", os.path.join(MODELS, "digits_cnn.onnx"), "-o", out,
                 "--check-runtime", ",".join(OTHER_RUNTIMES)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"ort", *OTHER_RUNTIMES} and all(rows[r].endswith("ok") for r in OTHER_RUNTIMES)
    # OpenVINO's relevance is close but not bit-identical: a zero tolerance must fail, with exit 7
    samples = os.path.join(MODELS, "digits_samples.npy")
    assert main(["check", out, "--runtime", "openvino", "--data", samples, "--tolerance", "0"]) == 7
    assert "DIFFERS" in capsys.readouterr().out


@needs_javascript
def test_a_runtime_that_cannot_start_is_a_failed_row_and_exit_7(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "digits.lrp.onnx")
    lrp_onnx.save_model(lrp_onnx.convert(os.path.join(MODELS, "digits_cnn.onnx")), out)
    monkeypatch.setenv("LRP_ONNX_CHROMIUM", "/bin/false")  # a real binary that is not a browser
    assert main(["check", out, "--runtime", "ort-web", "--runtime", "ort-node"]) == 7
    captured = capsys.readouterr()
    assert "ort-web" in captured.err and "FAILED" in captured.out and captured.out.count(" ok") == 1


def test_check_refuses_a_plain_model(capsys):
    assert main(["check", os.path.join(MODELS, "digits_cnn.onnx"), "--runtime", "openvino"]) == 2
    assert "not an explainer graph" in capsys.readouterr().err


@needs_javascript
def test_external_data_on_request_runs_on_the_web_runtime(tmp_path, capsys):
    model = str(tmp_path / "resnet18.onnx")
    exporters.torchvision_classifier("resnet18", model)
    out = str(tmp_path / "resnet18.lrp.onnx")
    assert main(["convert", model, "-o", out, "--external-data", "--check-runtime", "ort-web"]) == 0
    assert os.path.getsize(out + ".data") > os.path.getsize(out)  # the weights went beside the graph
    assert capsys.readouterr().out.splitlines()[-1].endswith("ok")

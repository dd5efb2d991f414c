"""Explainers on runtimes other than ONNX Runtime's Python CPU build, against it: OpenVINO's CPU
plug-in (with its f32 precision hint: its default on this CPU is bf16)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import exporters
import lrp_onnx

openvino = pytest.importorskip("openvino")
TOLERANCE = 1e-5  # relative L2 of the relevance against ONNX Runtime
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def square_mlp():
    """Square weights: OpenVINO shared one repacked weight between a Gemm and its transposed use
    (opposite transB) and silently computed the wrong product, error about 1.4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def on_openvino(path, feeds):
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(feeds)[compiled.output("relevance")]


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
    assert relative_l2(on_openvino(path, feeds), expected) <= TOLERANCE


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
def test_openvino_matches_ort_on_the_digits_cnn(tmp_path, composite):
    images = np.load(os.path.join(MODELS, "digits_samples.npy"))
    path = explainer_file(os.path.join(MODELS, "digits_cnn.onnx"), composite, tmp_path)
    expected = lrp_onnx.Explainer(str(path)).run(images)["relevance"]
    feeds = {"image": images, "target": np.full(len(images), -1, np.int64)}
    assert relative_l2(on_openvino(path, feeds), expected) <= TOLERANCE


def test_openvino_matches_ort_on_a_tiny_bert(tmp_path):
    """Square MatMul weights in every attention projection, token ids, a padded sequence."""
    feeds = exporters.hf_text_classifier("bert", str(tmp_path / "bert.onnx"))
    path = explainer_file(tmp_path / "bert.onnx", "attnlrp", tmp_path)
    expected = lrp_onnx.Explainer(str(path)).run(feeds)["relevance"]
    assert relative_l2(on_openvino(path, {**feeds, "target": np.full(2, -1, np.int64)}), expected) <= TOLERANCE


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

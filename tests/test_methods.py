"""Baseline methods built by the same reverse walk (method=): gradient against torch autograd
(CNNs, MLPs, and a transformer block),
sensitivity = gradient², and for a bias-free ReLU net, LRP-ε with a tiny ε = gradient × input."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lrp_onnx
from conftest import small_cnn
from test_conservation import networks
from zennit_reference import export

TARGETS = [2, 0, 4]


def autograd(model, x, targets):
    x = torch.from_numpy(x).requires_grad_(True)
    logits = model(x)
    logits[torch.arange(len(targets)), torch.tensor(targets)].sum().backward()
    return x.grad.numpy()


def activations_mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(),
                         nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.ReLU6(),
                         nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("build,shape", [(small_cnn, (3, 12, 12)), (activations_mlp, (3, 2, 2))],
                         ids=["cnn-bn-pools", "mlp-activations"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gradient_matches_autograd(tmp_path, build, shape, exporter):
    model = build()
    x = (3 * np.random.default_rng(1).standard_normal((3,) + shape)).astype(np.float32)
    path = export(model, torch.from_numpy(x), str(tmp_path / "net.onnx"), dynamo=exporter == "dynamo")
    expected = autograd(model, x, TARGETS)
    results = {m: lrp_onnx.Explainer(path, method=m).explain(x, TARGETS)[1]
               for m in ("gradient", "sensitivity", "gradient-x-input")}
    scale = np.abs(expected).max()
    np.testing.assert_allclose(results["gradient"], expected, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(results["sensitivity"], expected ** 2, rtol=1e-4, atol=1e-5 * scale ** 2)
    np.testing.assert_allclose(results["gradient-x-input"], expected * x, rtol=1e-4, atol=1e-5 * scale * 3)


class AttentionBlock(nn.Module):
    """Transformer pieces the chain rule must go through: LayerNorm (its true Jacobian, not the
    σ-constant linearisation LRP uses), GELU in both forms, a softmax attention."""

    def __init__(self, dim=6, classes=5):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.mlp = nn.Linear(dim, 3 * dim), nn.Sequential(nn.Linear(dim, 8), nn.GELU(approximate="tanh"),
                                                                   nn.Linear(8, dim), nn.GELU())
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        return self.head((x + self.mlp(self.norm2(x))).mean(1))


def test_gradient_through_layer_norm_gelu_and_attention_matches_autograd(tmp_path):
    torch.manual_seed(5)
    model = AttentionBlock().eval()
    x = np.random.default_rng(2).standard_normal((3, 4, 6)).astype(np.float32)
    path = export(model, torch.from_numpy(x), str(tmp_path / "block.onnx"), dynamo=True)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"LayerNormalization", "Gelu", "Softmax"} <= ops, ops
    expected = autograd(model, x, TARGETS)
    _, gradient = lrp_onnx.Explainer(path, method="gradient").explain(x, TARGETS)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", list(networks()))
def test_tiny_epsilon_equals_gradient_x_input_on_a_bias_free_relu_net(tmp_path, name):
    torch.manual_seed(1)
    model, shape = networks()[name]
    model.eval()
    x = torch.randn((3,) + shape)
    path = export(model, x, str(tmp_path / f"{name}.onnx"), dynamo=False)
    _, lrp = lrp_onnx.Explainer(path, composite="epsilon", epsilon=1e-9, stabilizer=1e-9).explain(x.numpy(), TARGETS)
    _, gxi = lrp_onnx.Explainer(path, method="gradient-x-input").explain(x.numpy(), TARGETS)
    np.testing.assert_allclose(lrp, gxi, rtol=1e-4, atol=1e-5 * np.abs(gxi).max())


def test_gates_and_rule_parameters_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3)).eval()
    path = export(model, torch.randn(2, 4), str(tmp_path / "silu.onnx"), dynamo=False)
    with pytest.raises(lrp_onnx.UnsupportedModelError, match="the gradient of a gate or normalisation"):
        lrp_onnx.convert(path, method="gradient")
    with pytest.raises(lrp_onnx.RuleError, match="method 'sensitivity' has no rules"):
        lrp_onnx.convert(path, method="sensitivity", epsilon=0.1)
    with pytest.raises(lrp_onnx.RuleError, match="unknown method 'saliency'"):
        lrp_onnx.convert(path, method="saliency")

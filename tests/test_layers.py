"""Relevance at inner layers (convert(layers=...), --layer): for a conserving composite on a
bias-free network, every layer holds the same total relevance, the explained logit."""

import numpy as np
import pytest
import torch
from torch import nn

import lrp_onnx
from lrp_onnx.emit import LAYER_PREFIX
from test_conservation import Residual
from zennit_reference import export


@pytest.fixture(scope="module")
def residual_net(tmp_path_factory):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), Residual(8), nn.MaxPool2d(2),
                          nn.Conv2d(8, 6, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 10, bias=False)).eval()
    x = torch.randn(3, 3, 12, 12)
    path = export(model, x, str(tmp_path_factory.mktemp("layers") / "net.onnx"), dynamo=False)
    plan = lrp_onnx.plan(path)
    # Only tensors that cut the graph hold all the relevance: not those inside the residual branch.
    return path, x.numpy(), [u.outputs[0].name for u in plan.units if "body" not in u.name]


@pytest.mark.parametrize("composite,params", [("zplus", {"stabilizer": 1e-9}),
                                              ("epsilon", {"epsilon": 1e-9, "stabilizer": 1e-9})])
def test_every_layer_holds_the_logit(residual_net, composite, params):
    path, x, layers = residual_net
    explainer = lrp_onnx.Explainer(lrp_onnx.convert(path, composite, layers=layers + ["input"], **params))
    named = explainer.run(x, target=[1, 4, 7])
    logit = named["explained_logit"]
    for name in layers + ["input"]:
        totals = named[LAYER_PREFIX + name].reshape(len(x), -1).sum(1)
        np.testing.assert_allclose(totals, logit, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(named[LAYER_PREFIX + "input"], named["relevance"])
    assert set(explainer.output_names) == {"logits"}


def test_channel_sums(residual_net):
    path, x, layers = residual_net
    conv = next(name for name in layers if "Conv" in name)
    full = lrp_onnx.Explainer(lrp_onnx.convert(path, "zplus", layers=[conv])).run(x)[LAYER_PREFIX + conv]
    summed = lrp_onnx.Explainer(lrp_onnx.convert(path, "zplus", layers=[conv], layer_sum="channel")).run(x)
    assert summed[LAYER_PREFIX + conv].shape == full.shape[:2]
    np.testing.assert_allclose(summed[LAYER_PREFIX + conv], full.sum((2, 3)), rtol=1e-5, atol=1e-6)


def test_unknown_layer_is_a_clear_error(residual_net):
    path, _, _ = residual_net
    with pytest.raises(lrp_onnx.InputError, match="layer 'nope': no such tensor"):
        lrp_onnx.convert(path, layers=["nope"])

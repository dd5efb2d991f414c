"""Conservation: for bias-free ReLU networks Σ_p R_p equals the explained logit (Bach et al. 2015),
under alpha-beta, zplus and epsilon with a tiny epsilon."""

import numpy as np
import pytest
import torch
from torch import nn

import lrp_onnx
from zennit_reference import export


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.relu(self.body(x) + x)


def networks():
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(48, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False)),
                (3, 4, 4)),
        "cnn-maxpool-avgpool": (nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 10, bias=False)), (3, 16, 16)),
        "residual": (nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), Residual(8), nn.MaxPool2d(3, 2, 1), Residual(8),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10, bias=False)), (3, 16, 16)),
    }


@pytest.fixture(scope="module", params=list(networks()))
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    model, shape = networks()[request.param]
    model.eval()
    x = torch.randn((4,) + shape)
    path = export(model, x, str(tmp_path_factory.mktemp("net") / f"{request.param}.onnx"), dynamo=False)
    return path, x.numpy()


@pytest.mark.parametrize("composite,params", [("alpha-beta", {}), ("alpha-beta", {"alpha": 1.5, "beta": 0.5}),
                                              ("zplus", {}), ("epsilon", {"epsilon": 1e-9})])
def test_relevance_sums_to_the_logit(exported, composite, params):
    path, x = exported
    outputs, relevance = lrp_onnx.Explainer(path, composite=composite, **params).explain(x, [-1, 3, 0, 9])
    logits = outputs["logits"]
    targets = np.array([logits[0].argmax(), 3, 0, 9])
    explained = logits[np.arange(4), targets]
    np.testing.assert_allclose(relevance.reshape(4, -1).sum(1), explained, rtol=1e-5, atol=1e-6)

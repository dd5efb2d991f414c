"""`lrp-onnx evaluate`'s region perturbation against Quantus's (Hedström et al. 2023), the metrics
library people use: the same torch model (exported for lrp-onnx), the same explanations, the same
regions and the same replacement value give the same score drops."""

import os
import sys

import numpy as np
import pytest
import torch

import lrp_onnx
from lrp_onnx.analysis.evaluate import evaluate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import synthetic_shapes as shapes  # noqa: E402
from train_shapes_cnn import as_input, network  # noqa: E402

import torchvision  # noqa: E402, F401  (quantus segfaults on import unless torchvision was imported first)
from conftest import extra_module  # noqa: E402

quantus = extra_module("quantus")

STEPS, PATCH = 12, 8


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A seeded shapes CNN (untrained: the measure does not need a good model) and its ONNX export."""
    torch.manual_seed(3)
    model = network().eval()
    x = as_input(shapes.generate(6, seed=21).images)
    path = str(tmp_path_factory.mktemp("quantus") / "twin.onnx")
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), path, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return model, path, x


@pytest.mark.parametrize("method", ["lrp:alpha-beta", "gradient-x-input"])
def test_region_perturbation_matches_quantus(twin, method):
    model, path, x = twin
    conversion = {"composite": method[4:]} if method.startswith("lrp:") else {"method": method}
    explainer = lrp_onnx.Explainer(path, **conversion)
    outputs, relevance = explainer.explain(x)
    targets = explainer.score(x)["explained_class"]
    ours = next(r for r in evaluate(path, x, [method], steps=STEPS, region=PATCH, low=0.0, high=0.0)
                if r.method == method)
    metric = quantus.RegionPerturbation(patch_size=PATCH, regions_evaluation=STEPS, order="morf",
                                        perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True)
    curves = np.asarray(metric(model=model, x_batch=x, y_batch=targets, a_batch=relevance, softmax=False,
                               device="cpu", channel_first=True), np.float64)  # [N, STEPS]: f(x) − f(x_k)
    assert curves.shape == (len(x), STEPS)
    scale = np.abs(curves).max()
    assert scale > 0
    np.testing.assert_allclose(ours.drops[1:], curves.mean(axis=0), atol=1e-4 * scale)
    # the AOPC as the seed paper defines it, from Quantus's curves (its step 0 drops nothing)
    assert ours.aopc == pytest.approx(np.concatenate([np.zeros((len(x), 1)), curves], 1).mean(1).mean(),
                                      abs=1e-4 * scale)

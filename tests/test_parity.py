"""Parity with Zennit: torchvision models × both torch.onnx exporters × six composites, relative L2
error ≤ 1e-4 per sample on a batch of 2 random inputs with different targets (32×32 inputs to keep CI
fast; benchmarks/parity.py runs the same comparison at 224×224). vgg11_bn with its own upsampling
head is also compared at 64×64."""

import pytest

from zennit_reference import parity_errors

MODELS = ["vgg16", "vgg11_bn", "resnet18", "resnet50"]
EXPORTERS = ["torchscript", "dynamo"]
COMPOSITES = ["alpha-beta", "epsilon", "zplus", "epsilon-alpha2-beta1", "epsilon-plus-flat", "epsilon-gamma-box"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Each model is built, exported and compared once; the tests below read the cache."""
    cache = {}

    def errors(model):
        if model not in cache:
            cache[model] = parity_errors(model, 32, COMPOSITES, EXPORTERS, str(tmp_path_factory.mktemp(model)))
        return cache[model]
    return errors


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("model", MODELS)
def test_matches_zennit(measured, model, exporter, composite):
    errors = measured(model)[exporter, composite]
    assert errors.max() <= TOLERANCE, f"relative L2 errors per sample: {errors}"


@pytest.mark.parametrize("model", ["resnet18", "vgg11_bn"])
def test_zero_params_bias_matches_zennit(tmp_path, model):
    """Zennit's zero_params=["bias"]: the rules leave biases (here the merged BatchNorm shifts and
    the classifier's bias) out of their split. Pure ε is left out: without the bias, z can be near
    zero where the activation is not, and R/z then amplifies float32 rounding in both libraries."""
    composites = [c for c in COMPOSITES if c != "epsilon"]
    errors = parity_errors(model, 32, composites, ["torchscript"], str(tmp_path), zero_params=["bias"])
    assert max(e.max() for e in errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_vgg_upsampling_head_matches_zennit(tmp_path):
    """vgg11_bn at 64 px with its own head: AdaptiveAvgPool2d(7) upsamples the 2×2 map, which the dynamo
    exporter writes as index arithmetic into GatherND and masked_fill (Where) of the padded windows."""
    composites = ["alpha-beta", "epsilon-gamma-box"]
    errors = parity_errors("vgg11_bn", 64, composites, ["dynamo"], str(tmp_path), keep_head=True)
    assert max(e.max() for e in errors.values()) <= 1.5e-5, errors

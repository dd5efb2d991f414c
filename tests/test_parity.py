"""Parity with Zennit: torchvision models × both torch.onnx exporters × six composites, relative L2
error ≤ 1e-4 per sample on a batch of 2 random inputs with different targets (32×32 inputs to keep CI
fast; benchmarks/parity.py runs the same comparison at 224×224)."""

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

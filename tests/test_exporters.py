"""Models from real exporters convert and run: the explainer reproduces every original output,
its relevance is finite and, under a conserving configuration, sums to the explained logit.
The full list is benchmarks/coverage.py; these are its representatives."""

import numpy as np
import onnx
import pytest

import exporters
import lrp_onnx
from lrp_onnx.verify import verify

# The epsilon composite with biases left out of the rules conserves relevance layer by layer; an
# ε far below the activations of random-init models absorbs none. (Its float32 failure mode, large
# dropped biases, and zplus's, neurons with no positive contribution, are in benchmarks/coverage.py.)
CONSERVING = {"composite": "epsilon", "zero_params": ["bias"], "epsilon": 1e-30, "stabilizer": 1e-30}


def assert_converts_and_conserves(path, feeds):
    result = verify(path, feeds=feeds, **CONSERVING)
    assert result.output_deviation <= 1e-5
    assert result.finite
    assert result.conservation_error <= 1e-4
    return result


@pytest.mark.parametrize("name", exporters.LIGHT_ZOO)
def test_model_zoo_light_model(name):
    path, feeds, expected = exporters.light_zoo(name)
    assert_converts_and_conserves(path, feeds)
    outputs, relevance = lrp_onnx.Explainer(path, composite="epsilon-plus-flat").explain(feeds)
    rtol, atol = exporters.LIGHT_ZOO_TOLERANCE.get(name, (1e-3, 1e-7))
    np.testing.assert_allclose(next(iter(outputs.values())), expected, rtol=rtol, atol=atol)
    assert relevance.shape == next(iter(feeds.values())).shape


@pytest.mark.parametrize("name,exporter", [
    ("mobilenet_v3_small", "torchscript"),  # Hardswish, squeeze-excitation gates
    ("mobilenet_v3_small", "dynamo"),
    ("efficientnet_b0", "torchscript"),     # SiLU, squeeze-excitation, stochastic depth
    ("convnext_tiny", "torchscript"),       # LayerNormalization, channels-last Linear, layer scale
    ("convnext_tiny", "dynamo"),
    ("shufflenet_v2_x0_5", "torchscript"),  # channel shuffle: shape arithmetic, Slice
    ("shufflenet_v2_x0_5", "dynamo"),
    ("googlenet", "torchscript"),           # ceil-mode MaxPool, Concat of branches
    ("densenet121", "dynamo"),
    ("squeezenet1_1", "torchscript"),
    ("regnet_y_400mf", "torchscript"),
    ("mnasnet0_5", "dynamo"),
])
def test_torchvision_classifier(tmp_path, name, exporter):
    path = str(tmp_path / f"{name}.onnx")
    feeds = exporters.torchvision_classifier(name, path, exporter)
    assert_converts_and_conserves(path, feeds)


@pytest.mark.parametrize("zipmap", [True, False])
@pytest.mark.parametrize("name", exporters.SKLEARN)
def test_sklearn_classifier(tmp_path, name, zipmap):
    path = str(tmp_path / f"{name}.onnx")
    feeds = exporters.sklearn_classifier(name, path, zipmap)
    assert_converts_and_conserves(path, feeds)
    explainer = lrp_onnx.Explainer(path, composite="epsilon")
    named = explainer.run(feeds)
    labels = named["output_label" if zipmap else "label"]
    np.testing.assert_array_equal(named["explained_class"], labels)  # iris labels are the class indices
    assert named["relevance"].shape == feeds["X"].shape


def test_binary_sklearn_classifier_explains_the_chosen_class(tmp_path):
    path = str(tmp_path / "logreg.onnx")
    feeds = exporters.sklearn_classifier("logistic-regression", path, zipmap=True, binary=True)
    assert_converts_and_conserves(path, feeds)
    named = lrp_onnx.Explainer(path, composite="epsilon").run(feeds, target=1)
    assert (named["explained_class"] == 1).all()
    assert len(named["output_probability"]) == len(feeds["X"])  # the ZipMap output is still there


def test_dynamic_batch_one_and_seven_through_one_explainer(tmp_path):
    path = str(tmp_path / "net.onnx")
    exporters.torchvision_classifier("mobilenet_v3_small", path, batch=2)
    explainer = lrp_onnx.Explainer(path, composite="epsilon-plus-flat")
    x = np.random.default_rng(3).standard_normal((7, 3, 64, 64)).astype(np.float32)
    _, seven = explainer.explain(x, target=4)
    _, one = explainer.explain(x[5:6], target=4)
    assert seven.shape == x.shape
    np.testing.assert_allclose(one[0], seven[5], rtol=1e-4, atol=1e-6 * np.abs(seven[5]).max())


def test_fixed_batch_model_rejects_another_batch_size(tmp_path):
    import torch
    path = str(tmp_path / "fixed.onnx")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    torch.onnx.export(model, (torch.randn(3, 3, 4),), path, dynamo=False, input_names=["x"], output_names=["y"])
    assert [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim][0] == 3
    x = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
    assert_converts_and_conserves(path, {"x": x})
    with pytest.raises(lrp_onnx.InputError, match=r"input 'x' takes shape \[3, 3, 4\]; got \[1, 3, 4\]"):
        lrp_onnx.Explainer(path).explain(x[:1])

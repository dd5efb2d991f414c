"""Models exported with dynamic image sizes convert once and explain inputs of any size they
accept: the explainer of a resnet18 with dynamic height and width, run at three sizes, against the
explainer of a static export at each size; and ``--shape`` for what needs a size pinned."""

import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision

import lrp_onnx
from test_cli import assert_bad_input, cli

SIZES = [(64, 64), (96, 80), (57, 71)]


def export(model, x, path, dynamic_image):
    axes = {"x": {0: "N", 2: "H", 3: "W"} if dynamic_image else {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes=axes)
    return str(path)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    folder = tmp_path_factory.mktemp("dynamic")
    return model, folder, export(model, torch.randn(1, 3, 64, 64), folder / "dynamic.onnx", True)


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-plus-flat"])
def test_one_conversion_explains_every_size_as_a_static_export_does(resnet, composite):
    model, folder, path = resnet
    explainer = lrp_onnx.Explainer(path, composite=composite)
    assert explainer.input_shape[2:] == ["H", "W"]
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h)).numpy()
        static = export(model, torch.as_tensor(x), folder / f"static-{h}x{w}.onnx", False)
        expected = lrp_onnx.Explainer(static, composite=composite).run(x)
        outputs = explainer.run(x)
        np.testing.assert_array_equal(outputs["logits"], expected["logits"])
        error = np.linalg.norm(outputs["relevance"] - expected["relevance"]) / np.linalg.norm(expected["relevance"])
        assert error <= 1e-6, (h, w, error)


def test_shape_pins_a_dynamic_size(resnet, tmp_path):
    """--shape declares the sizes, so the explainer is the static one (what TensorRT and the view
    form of MaxPool's backward need); it keeps a named size dynamic, and refuses a static size changed."""
    _, _, path = resnet
    out = tmp_path / "pinned.lrp.onnx"
    result = cli("convert", path, "--shape", "x=N,3,64,64", "-o", out)
    assert result.returncode == 0, result.stderr
    dims = [d.dim_value or d.dim_param for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 64, 64]
    assert not any(n.op_type == "ScatterElements" for n in onnx.load(out).graph.node)  # MaxPool's view form
    assert_bad_input(cli("convert", path, "--shape", "x=N,4,64,64", "-o", tmp_path / "e.onnx"),
                     "changes the static size 3", code=2)
    assert_bad_input(cli("convert", path, "--shape", "y=1,3,64,64", "-o", tmp_path / "e.onnx"),
                     "'y', which is no graph input", code=2)


def test_a_size_that_must_be_static_names_the_option_that_pins_it():
    """auto_pad SAME pads by the input's size; left dynamic, the error suggests --shape, which then converts."""
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="same", auto_pad="SAME_UPPER", strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        "same", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(lrp_onnx.UnsupportedOpError, match=r"auto_pad SAME needs a static .* convert --shape NAME=DIMS"):
        lrp_onnx.convert(model)
    assert lrp_onnx.convert(model, input_shapes={"x": ["N", 3, 9, 9]}) is not None

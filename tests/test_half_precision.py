"""Half-precision models: float16 and bfloat16 classifiers are explained in float32
(lrp_onnx/precision.py) behind the original's inputs and outputs.

The reference is the float32 explainer of the same weights. Upcasting float16 and bfloat16 to
float32 is exact and the relevance pass is the float32 one, so the measured difference is 0 and
the tolerance is 0: relevance is compared bit for bit. A float16 model's outputs are its own run's
on ONNX Runtime, bit for bit: the explainer keeps its float16 forward.
"""

import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import lrp_onnx
from conftest import small_cnn
from lrp_onnx.load import load_model
from lrp_onnx.precision import upcast_to_float32
from lrp_onnx.quantized import MIRROR
from zennit_reference import export

COMPOSITES = ("epsilon", "alpha-beta", "epsilon-plus-flat", "zplus")
NUMPY_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
               TensorProto.BFLOAT16: ml_dtypes.bfloat16}
HALF = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
FLOAT16_UNIT_ROUNDOFF = 2.0 ** -11  # half a float16 ulp, relative


def fused_cnn(dtype):
    """conftest's small CNN with its BatchNorm merged into the conv in float32, then cast to ``dtype``.
    Merged beforehand, so that the exporter has nothing to fold: it would fold in the model's own
    precision, giving the half-precision file other weights than the float32 one."""
    model = small_cnn()
    fused = nn.Sequential(fuse_conv_bn_eval(model[0], model[1]), *model[2:]).eval()
    return fused.to(dtype)


def export_bfloat16(model, x, path):
    """torch.onnx (TorchScript) at opset 22, the first with bfloat16 Conv. At its default opset, 20,
    it writes bfloat16 Conv anyway, which the ONNX checker and ONNX Runtime refuse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=22, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """{"float16"/"bfloat16": the CNN exported in that type, "float32": the float16 weights in a
    float32 model, "float32-of-bfloat16": the bfloat16 weights in a float32 model}, by torch.onnx
    (TorchScript), the bfloat16 ones at opset 22."""
    folder = tmp_path_factory.mktemp("half")
    x = torch.randn(2, 3, 12, 12)
    paths = {}
    for name, weights, dtype in [("float16", torch.float16, torch.float16), ("float32", torch.float16, torch.float32)]:
        paths[name] = export(fused_cnn(weights).to(dtype), x.to(dtype), str(folder / f"{name}.onnx"), dynamo=False)
    for name, dtype in [("bfloat16", torch.bfloat16), ("float32-of-bfloat16", torch.float32)]:
        model = fused_cnn(torch.bfloat16).to(dtype)
        paths[name] = export_bfloat16(model, x.to(dtype), str(folder / f"{name}.onnx"))
    return paths


@pytest.fixture
def images16():
    return np.random.default_rng(5).standard_normal((3, 3, 12, 12)).astype(np.float16)


def run_onnx_runtime(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def relative_l2(a, b):
    return np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))


def test_float16_explainer_keeps_the_models_inputs_and_outputs(cnn):
    original = onnx.load(cnn["float16"])
    explainer = lrp_onnx.convert(cnn["float16"])
    assert [i.name for i in explainer.graph.input] == [i.name for i in original.graph.input] + ["target"]
    assert explainer.graph.input[0].type == original.graph.input[0].type  # float16, symbolic batch
    outputs = {o.name: o.type.tensor_type.elem_type for o in explainer.graph.output}
    assert outputs == {"logits": TensorProto.FLOAT16, "relevance": TensorProto.FLOAT,
                       "explained_class": TensorProto.INT64, "explained_logit": TensorProto.FLOAT}
    # the model's float16 weights, for its own forward, and their float32 twins, for the relevance pass
    weights = {t.name: numpy_helper.to_array(t) for t in explainer.graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    assert originals and all(t.dtype == np.float16 for t in originals.values())
    for name, values in originals.items():
        np.testing.assert_array_equal(weights[name], values)
        assert weights[name + MIRROR].dtype == np.float32
        np.testing.assert_array_equal(weights[name + MIRROR], values.astype(np.float32))


def test_float16_forward_outputs_match_the_original_on_onnx_runtime(cnn, images16):
    outputs, relevance = lrp_onnx.Explainer(cnn["float16"]).explain(images16)
    (expected,) = run_onnx_runtime(cnn["float16"], images16)
    assert outputs["logits"].dtype == np.float16 and relevance.dtype == np.float32
    np.testing.assert_array_equal(outputs["logits"], expected)


def test_the_class_explained_by_default_is_the_float16_models_own_prediction():
    """A near tie that float16 rounds to a tie: logits 2048 and 2049, which float16 stores as 2048 and
    2048 (its spacing there is 2). The model predicts the first class (ArgMax takes the first of
    equal values); its float32 mirror would predict the second. The explainer explains the model's
    prediction, with the mirror's logit."""
    x = np.ones((1, 2), np.float16)
    weights = np.array([[2048, 0], [2048, 1]], np.float16)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "tie",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 2])],
        [numpy_helper.from_array(weights.T.copy(), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    named = lrp_onnx.Explainer(model, composite="epsilon").run(x, -1)
    assert named["logits"].tolist() == [[2048, 2048]]
    assert named["explained_class"].tolist() == [0]
    assert named["explained_logit"].tolist() == [2048]  # the mirror's logit of class 0


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("name,x", [
    ("normal", np.random.default_rng(5).standard_normal((3, 3, 12, 12))),
    ("largest", np.full((2, 3, 12, 12), np.finfo(np.float16).max) * np.array([1, -1]).reshape(2, 1, 1, 1)),
    ("smallest subnormal", np.full((1, 3, 12, 12), np.finfo(np.float16).smallest_subnormal)),
    ("all-zero", np.zeros((1, 3, 12, 12)))])
def test_float16_relevance_equals_the_float32_explainer_of_the_same_weights(cnn, composite, name, x):
    """Bit for bit (see the module docstring), finite at float16's extremes, and the float16 output
    is the float32 one rounded. All-zero input with biases left out of the rules: the first layer's
    z is 0 exactly and only the stabilizer keeps R·x/z finite."""
    x16 = x.astype(np.float16)
    params = {"zero_params": ["bias"]} if name == "all-zero" else {}
    out16, relevance16 = lrp_onnx.Explainer(cnn["float16"], composite=composite, **params).explain(x16)
    _, relevance32 = lrp_onnx.Explainer(cnn["float32"], composite=composite, **params).explain(x16.astype(np.float32))
    assert np.isfinite(relevance16).all()
    np.testing.assert_array_equal(relevance16, relevance32)
    np.testing.assert_array_equal(out16["logits"], run_onnx_runtime(cnn["float16"], x16)[0])


def test_a_float32_value_beyond_float16s_range_is_an_input_error(cnn, images16):
    x = images16.astype(np.float32)
    x[0, 0, 0, 0] = 1e5
    with pytest.raises(lrp_onnx.InputError, match="input 'input' takes float16, whose largest value is 65504"):
        lrp_onnx.Explainer(cnn["float16"]).explain(x)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("name,x", [
    ("normal", np.random.default_rng(5).standard_normal((3, 3, 12, 12))),
    ("smallest subnormal", np.full((1, 3, 12, 12), ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)),
    ("all-zero", np.zeros((1, 3, 12, 12)))])
def test_bfloat16_relevance_equals_the_float32_explainer_of_the_same_weights(cnn, composite, name, x):
    """The bfloat16 model's explainer takes and returns float32 (numpy has no bfloat16), rounds its
    input to bfloat16 as the model would, and returns bfloat16 values."""
    x = x.astype(np.float32)
    rounded = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    params = {"zero_params": ["bias"]} if name == "all-zero" else {}
    explainer = lrp_onnx.Explainer(cnn["bfloat16"], composite=composite, **params)
    assert explainer.inputs["input"].type == "tensor(float)"
    out16, relevance16 = explainer.explain(x)
    out32, relevance32 = lrp_onnx.Explainer(cnn["float32-of-bfloat16"], composite=composite, **params).explain(rounded)
    assert np.isfinite(relevance16).all()
    np.testing.assert_array_equal(relevance16, relevance32)
    assert out16["logits"].dtype == np.float32
    np.testing.assert_array_equal(out16["logits"], out32["logits"].astype(ml_dtypes.bfloat16).astype(np.float32))


def hand_built_cnn(weights_type, precision=None, boundary_type=None):
    """A CNN written with onnx.helper, opset 22 (the first with bfloat16 Conv): Casts to the weights'
    type, Conv, an unmerged BatchNormalization, Relu, MaxPool, a Constant scale, a ConstantOfShape
    bias, Gemm. Weights and constants are the same float32 draws every time, rounded to
    ``precision`` (default: ``weights_type``) and stored in ``weights_type``: the float32 twin of
    the float16 model is ``hand_built_cnn(FLOAT, precision=FLOAT16)``. With ``boundary_type`` FLOAT,
    input and output are float32 around a ``weights_type`` inside."""
    boundary_type = boundary_type or weights_type
    rng = np.random.default_rng(7)

    def tensor(name, shape, low=-0.5, high=0.5):
        values = rng.uniform(low, high, shape).astype(np.float32).astype(NUMPY_TYPES[precision or weights_type])
        return numpy_helper.from_array(values.astype(NUMPY_TYPES[weights_type]), name)

    weights = [tensor("conv.w", [4, 2, 3, 3]), tensor("conv.b", [4]), tensor("bn.scale", [4], 0.5, 1.5),
               tensor("bn.bias", [4]), tensor("bn.mean", [4]), tensor("bn.var", [4], 0.5, 1.5),
               tensor("fc.w", [3, 16]), tensor("fc.b", [3])]
    nodes = [helper.make_node("Cast", ["x"], ["x_cast"], to=weights_type),
             helper.make_node("Conv", ["x_cast", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Constant", [], ["half"], value=tensor("half", [], 0.5, 0.5)),
             helper.make_node("Mul", ["p", "half"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1, name="fc"),
             helper.make_node("Constant", [], ["bias_shape"], value=numpy_helper.from_array(np.array([1, 3]))),
             helper.make_node("ConstantOfShape", ["bias_shape"], ["bias"], value=tensor("fill", [1], 0.25, 0.25)),
             helper.make_node("Add", ["g", "bias"], ["y"]),
             helper.make_node("Cast", ["y"], ["logits"], to=boundary_type)]
    graph = helper.make_graph(nodes, "half_cnn", [helper.make_tensor_value_info("x", boundary_type, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("logits", boundary_type, ["N", 3])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])


def half_values(proto):
    """Every place the loaded model could still hold a half-precision type."""
    graph = proto.graph
    types = [v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)]
    types += [t.data_type for t in graph.initializer]
    types += [a.t.data_type if a.type == onnx.AttributeProto.TENSOR else a.i
              for n in graph.node for a in n.attribute if a.name in ("value", "to")]
    return [t for t in types if t in HALF.values()]


def mirror_part(proto):
    """The float32 mirror that the load step adds to a float16 model: its nodes and tensors."""
    mirror = onnx.ModelProto()
    mirror.CopyFrom(proto)
    graph = mirror.graph
    for listed in (graph.node, graph.initializer, graph.value_info, graph.input, graph.output):
        kept = [item for item in listed if (item.output[0] if isinstance(item, onnx.NodeProto) else item.name)
                .endswith(MIRROR)]
        del listed[:]
        listed.extend(kept)
    assert graph.node and graph.initializer and graph.value_info
    return mirror


@pytest.mark.parametrize("half", HALF)
def test_hand_built_half_model_is_upcast_and_explained_as_its_float32_twin(half):
    model, twin = hand_built_cnn(HALF[half]), hand_built_cnn(TensorProto.FLOAT, precision=HALF[half])
    loaded, _ = load_model(model)
    assert half_values(model)
    # bfloat16: upcast throughout; float16: the model's own forward and a float32 mirror of it
    assert not half_values(loaded if half == "bfloat16" else mirror_part(loaded))
    assert (len(loaded.graph.node) > len(model.graph.node)) == (half == "float16")
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 4)).astype(np.float32)
    x_rounded = x.astype(NUMPY_TYPES[HALF[half]]).astype(np.float32)
    x_fed = x.astype(np.float16) if half == "float16" else x
    for composite in COMPOSITES:
        _, relevance = lrp_onnx.Explainer(model, composite=composite).explain(x_fed)
        _, expected = lrp_onnx.Explainer(twin, composite=composite).explain(x_rounded)
        np.testing.assert_array_equal(relevance, expected, err_msg=composite)


def test_onnx_runtime_cpu_cannot_run_a_bfloat16_model_itself():
    """Why a bfloat16 model gets a float32 relevance pass: the CPU provider has no bfloat16 Conv.
    (torch.onnx's bfloat16 exports at opset 20 are not even valid: bfloat16 Conv came with opset 22.)"""
    model = hand_built_cnn(TensorProto.BFLOAT16)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.NotImplemented, match="implementation for Conv"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_upcast_leaves_the_outputs_unchanged_up_to_float16_rounding():
    """The load step on its own, on ONNX Runtime."""
    model = hand_built_cnn(TensorProto.FLOAT16)
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 4)).astype(np.float16)
    (before,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    upcast = upcast_to_float32(model, "half_cnn")
    (after,) = ort.InferenceSession(upcast.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})
    assert after.dtype == np.float32
    # ORT runs this float16 model in float32 too, but first merges the BatchNormalization into the
    # Conv weights in float16, rounding them. Measured: at most 1.75 units of float16 roundoff
    # (relative L2) over 200 random batches of 8; allowed: 4.
    assert relative_l2(after, before.astype(np.float32)) <= 4 * FLOAT16_UNIT_ROUNDOFF


def test_a_float32_model_is_left_alone():
    model = hand_built_cnn(TensorProto.FLOAT)
    assert upcast_to_float32(model, "float32_cnn") is model


def test_mixed_precision_model_keeps_its_float32_boundary():
    """float32 in, float16 inside, float32 out: the explainer is float32 throughout, with no boundary
    casts; the Cast to float16 after the input becomes one to float32, so the input is not rounded."""
    model = hand_built_cnn(TensorProto.FLOAT16, boundary_type=TensorProto.FLOAT)
    explainer = lrp_onnx.convert(model)
    assert explainer.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert explainer.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert not [n for n in explainer.graph.node if n.name.startswith("lrp/precision/")]
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 4)).astype(np.float32)
    _, relevance = lrp_onnx.Explainer(explainer).explain(x)
    _, expected = lrp_onnx.Explainer(hand_built_cnn(TensorProto.FLOAT, precision=TensorProto.FLOAT16)).explain(x)
    np.testing.assert_array_equal(relevance, expected)


def test_a_half_precision_type_attribute_outside_the_standard_ops_is_refused():
    model = hand_built_cnn(TensorProto.FLOAT16)
    model.graph.node.append(helper.make_node("Quantize", ["logits"], ["q"], domain="com.example", name="quant",
                                             to=TensorProto.FLOAT16))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(lrp_onnx.UnsupportedModelError, match="node 'quant' \\(com.example.Quantize\\)"):
        load_model(model)


def test_onnx_runtimes_float16_converter_with_float32_boundary_converts(cnn):
    """ONNX Runtime's converter appends the Casts of the kept float32 inputs after the nodes that read
    them, which the ONNX checker refuses and ONNX Runtime runs: the nodes are sorted, not refused. Its
    weights are the float16 ones, so the relevance is the float32 explainer's, bit for bit."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(cnn["float32"]), keep_io_types=True)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    outputs, relevance = lrp_onnx.Explainer(model).explain(x)
    _, expected = lrp_onnx.Explainer(cnn["float32"]).explain(x)
    np.testing.assert_array_equal(relevance, expected)
    (own,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_array_equal(outputs["logits"], own)

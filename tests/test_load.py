"""Each canonicalisation step of lrp_onnx/load.py leaves the model's outputs unchanged."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import exporters
from lrp_onnx.graph import carries_relevance, find_units
from lrp_onnx.errors import ModelLoadError
from lrp_onnx.load import (GRAPH_STEPS, PROTO_STEPS, declare_output_shapes, drop_identities, drop_initializer_inputs,
                           expand_linear_classifiers, fold_constants, import_graph, infer_shapes, load_model,
                           name_nodes, upgrade_opset)
from lrp_onnx.quantized import MIRROR, QuantizedWeight, mirror_qdq_forward, read_quantized_weights
from lrp_onnx.precision import explain_in_float32, release_mirror_outputs


def run(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_graph(graph, feeds):
    return run(gs.export_onnx(graph), feeds)


def assert_same_outputs(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        if isinstance(b, list):  # ZipMap
            assert b == pytest.approx(a)
        elif b.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        else:
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def caffe2_squeezenet():
    path, feeds, _ = exporters.light_zoo("squeezenet")
    return onnx.load(path), feeds


def test_the_steps_are_listed_in_order():
    assert PROTO_STEPS == (drop_initializer_inputs, explain_in_float32, upgrade_opset, infer_shapes)
    assert GRAPH_STEPS == (expand_linear_classifiers, fold_constants, read_quantized_weights, drop_identities,
                           name_nodes, release_mirror_outputs, mirror_qdq_forward)


def test_initializers_leave_the_inputs(caffe2_squeezenet):
    proto, feeds = caffe2_squeezenet
    assert len(proto.graph.input) > 1 and proto.ir_version == 3
    stepped = drop_initializer_inputs(proto, "squeezenet")
    assert [i.name for i in stepped.graph.input] == list(feeds)
    assert len(proto.graph.input) > 1, "the caller's model must not change"
    assert_same_outputs(run(proto, feeds), run(stepped, feeds))


def test_opset_upgrade_keeps_outputs(caffe2_squeezenet):
    proto, feeds = caffe2_squeezenet
    proto = drop_initializer_inputs(proto, "squeezenet")
    stepped = upgrade_opset(proto, "squeezenet")
    assert [o.version for o in stepped.opset_import if o.domain == ""] == [13]
    assert_same_outputs(run(proto, feeds), run(stepped, feeds))


def test_shape_inference_keeps_outputs_and_static_channels_of_a_channel_shuffle(tmp_path):
    path = str(tmp_path / "shufflenet.onnx")
    feeds = exporters.torchvision_classifier("shufflenet_v2_x0_5", path)
    proto = onnx.load(path)
    stepped = infer_shapes(proto, "shufflenet")
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in stepped.graph.value_info}
    shuffled = [s for name, s in shapes.items() if "Reshape_1_output" in name and len(s) == 4]
    assert shuffled and all(isinstance(s[1], int) and s[1] > 0 for s in shuffled), shuffled
    assert_same_outputs(run(proto, feeds), run(stepped, feeds))


def test_constant_folding_turns_constantofshape_weights_and_shape_arithmetic_into_constants(tmp_path):
    path, feeds, _ = exporters.light_zoo("squeezenet")
    proto, _ = load_model(path)
    graph = gs.import_onnx(proto)
    assert any(n.op == "ConstantOfShape" for n in graph.nodes)
    before = run_graph(graph, feeds)
    fold_constants(graph)
    assert not any(n.op == "ConstantOfShape" for n in graph.nodes)
    assert_same_outputs(before, run_graph(graph, feeds))

    shuffle = str(tmp_path / "shufflenet.onnx")
    feeds = exporters.torchvision_classifier("shufflenet_v2_x0_5", shuffle)
    graph = gs.import_onnx(load_model(shuffle)[0])
    sliced = [n for n in graph.nodes if n.op == "Slice"]
    assert any(not isinstance(t, gs.Constant) for n in sliced for t in n.inputs[1:])
    before = run_graph(graph, feeds)
    fold_constants(graph)
    assert all(isinstance(t, gs.Constant) for n in graph.nodes if n.op == "Slice" for t in n.inputs[1:])
    assert_same_outputs(before, run_graph(graph, feeds))


def _identity_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32) / 7 - 0.5)
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id1"),
             helper.make_node("Dropout", ["a"], ["b"], name="drop"),
             helper.make_node("MatMul", ["b", "w"], ["c"], name="mm"),
             helper.make_node("Identity", ["c"], ["y"], name="id_out")]
    return helper.make_model(helper.make_graph(nodes, "ids", [x], [y], [w]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_identity_and_dropout_are_dropped_but_an_output_keeps_its_name():
    proto = _identity_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    graph = gs.import_onnx(proto)
    drop_identities(graph)
    assert [n.name for n in graph.nodes] == ["mm", "id_out"]
    assert [t.name for t in graph.outputs] == ["y"]
    assert_same_outputs(run(proto, feeds), run_graph(graph, feeds))


def test_an_output_declared_without_a_shape_gets_the_inferred_one():
    proto = _identity_model()
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    before = proto.SerializeToString()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    declared, repairs = declare_output_shapes(proto, "ids")
    assert proto.SerializeToString() == before, "the caller's model must not change"
    assert helper.printable_type(declared.graph.output[0].type) == "FLOAT, Nx3"
    assert repairs == ["ids: output 'y' declares no shape, which the ONNX checker requires (ONNX Runtime does not); "
                       "converting with the inferred shape [N, 3]"]
    onnx.checker.check_model(declared, full_check=True)
    assert_same_outputs(run(proto, feeds), run(declared, feeds))


def test_an_output_without_a_shape_that_inference_cannot_find_is_refused():
    """The explainer, which keeps the outputs' types, would fail the checker in turn."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, ["rank"])  # Reshape's output rank is unknown
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                                                [x, shape], [y]), opset_imports=[helper.make_opsetid("", 17)])
    run(proto, {"x": np.ones((2, 4), np.float32), "shape": np.array([2, 2, 2])})  # ONNX Runtime runs it
    with pytest.raises(ModelLoadError, match="output 'y' declares no shape, which the ONNX checker requires, and "
                                             "shape inference finds none"):
        declare_output_shapes(proto, "reshape")


@pytest.mark.parametrize("binary", [False, True])
def test_linear_classifier_becomes_gemm_softmax_and_label_gather(tmp_path, binary):
    path = str(tmp_path / "logreg.onnx")
    feeds = exporters.sklearn_classifier("logistic-regression", path, zipmap=False, binary=binary)
    proto = onnx.load(path)
    graph = gs.import_onnx(proto)
    expand_linear_classifiers(graph)
    assert "LinearClassifier" not in {n.op for n in graph.nodes}
    assert {"Gemm", "ArgMax", "Gather"} <= {n.op for n in graph.nodes}
    assert_same_outputs(run(proto, feeds), run_graph(graph, feeds))


def test_node_names_become_unique():
    graph = gs.import_onnx(_identity_model())
    for node in graph.nodes:
        node.name = ""
    graph.nodes[1].name = "same"
    graph.nodes[2].name = "same"
    name_nodes(graph)
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names) and all(names)


def test_shape_subgraphs_carry_no_relevance(tmp_path):
    """torch's channel shuffle and dynamic Reshape compute shapes from Shape(x): no unit may
    produce an integer tensor, so relevance never flows into one."""
    path = str(tmp_path / "shufflenet.onnx")
    exporters.torchvision_classifier("shufflenet_v2_x0_5", path, exporter="dynamo")
    graph = import_graph(load_model(path)[0])
    units = find_units(graph, graph.inputs[0], graph.outputs)
    assert units and all(carries_relevance(t) for u in units for t in u.outputs)
    assert not any(u.op in ("Shape", "ArgMax", "Equal", "Less") for u in units)


def test_converting_does_not_import_torch():
    """ORT's shape inference lives in onnxruntime.tools, whose __init__ imports torch wherever it is
    installed (as here): lrp-onnx loads the one file it needs instead."""
    import os
    import subprocess
    import sys
    code = ("import sys, lrp_onnx; lrp_onnx.convert(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "digits_cnn.onnx")
    result = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def quantized_cnn(tmp_path_factory):
    import quantized_models
    folder = tmp_path_factory.mktemp("quantized")
    path = quantized_models.residual_cnn(folder / "cnn.onnx")
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    return {form: quantized_models.quantize(path, form, folder / f"{form}.onnx") for form in quantized_models.FORMS}, feeds


def test_quantized_weights_stay_in_the_forward_and_carry_their_values(quantized_cnn):
    """Folding would turn DequantizeLinear(int8 weight) into a float weight, and a runtime would then
    run that layer in float; the node stays, and its output holds the values it computes."""
    paths, feeds = quantized_cnn
    proto, _ = load_model(paths["qdq"])
    graph = gs.import_onnx(proto)
    before = run_graph(graph, feeds)
    fold_constants(graph)
    dequantized = [n for n in graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]
    assert len(dequantized) == 10  # five layers, each a weight and a bias
    read_quantized_weights(graph)
    weights = [n.outputs[0] for n in dequantized]
    assert all(isinstance(w, QuantizedWeight) for w in weights)
    # each one's values are what ONNX Runtime computes for that node
    exposed = gs.export_onnx(graph)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(w.name) for w in weights)
    computed = run(exposed, feeds)[-len(weights):]
    for weight, value in zip(weights, computed):
        np.testing.assert_array_equal(weight.values, value)
    assert_same_outputs(before, run_graph(graph, feeds))


def test_the_mirror_of_a_qdq_forward_computes_the_same_and_takes_the_node_names(quantized_cnn):
    paths, feeds = quantized_cnn
    graph = import_graph(load_model(paths["qdq"])[0])
    originals = [n for n in graph.nodes if n.name.endswith(MIRROR)]
    mirrors = [n for n in graph.nodes if n.name + MIRROR in {o.name for o in originals}]
    assert originals and len(mirrors) == len(originals)
    assert all(t.name.endswith(MIRROR) for n in mirrors for t in n.outputs)
    exposed = gs.export_onnx(graph)
    exposed.graph.output.append(helper.make_empty_tensor_value_info("logits" + MIRROR))
    logits, mirrored = run(exposed, feeds)
    np.testing.assert_array_equal(mirrored, logits)
    qoperator = import_graph(load_model(paths["qoperator"])[0])  # its integer tensors are read freely
    assert not any(n.name.endswith(MIRROR) for n in qoperator.nodes)


def test_shapes_of_a_qoperator_model_are_inferred_through_its_standard_twin(quantized_cnn):
    """ONNX's inference knows no com.microsoft op: without the twin, QLinearAdd's output, and all
    after it, would have no shape, which the strided convolution after it needs."""
    paths, _ = quantized_cnn
    proto = infer_shapes(load_model(paths["qoperator"])[0], "qoperator")
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in proto.graph.value_info}
    added = next(n.output[0] for n in proto.graph.node if n.op_type == "QLinearAdd")
    assert shapes[added][1:] == [8, 8, 8]


def test_nodes_out_of_order_are_sorted_and_a_cycle_is_refused():
    proto = _identity_model()
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(proto)
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(nodes))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    loaded, _ = load_model(shuffled)
    assert [n.name for n in loaded.graph.node] == ["id1", "drop", "mm", "id_out"]
    assert_same_outputs(run(proto, feeds), run(loaded, feeds))
    assert [n.name for n in shuffled.graph.node] == ["id_out", "mm", "drop", "id1"], "the caller's model stays"
    cycle = onnx.ModelProto()
    cycle.CopyFrom(proto)
    cycle.graph.node[0].input[0] = "y"  # id1 reads the output of id_out, which depends on id1
    with pytest.raises(ModelLoadError, match="cycle through node"):
        load_model(cycle)

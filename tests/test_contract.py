"""The explainer graph contract (docs/reference/explainer-graph.md): inputs, outputs, seed, opset, size."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import lrp_onnx
from conftest import small_cnn
from zennit_reference import export


def run_original(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_inputs_and_outputs(cnn_path, images):
    original = onnx.load(cnn_path)
    explainer = lrp_onnx.convert(cnn_path)
    assert [i.name for i in explainer.graph.input] == [i.name for i in original.graph.input] + ["target"]
    assert explainer.graph.input[0].type == original.graph.input[0].type  # names, dtypes, symbolic batch
    assert explainer.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    target = explainer.graph.input[-1].type.tensor_type
    assert target.elem_type == TensorProto.INT64 and len(target.shape.dim) == 1
    added = ["relevance", "explained_class", "explained_logit"]
    assert [o.name for o in explainer.graph.output] == [o.name for o in original.graph.output] + added
    types = {o.name: o.type.tensor_type for o in explainer.graph.output}
    assert types["relevance"].elem_type == TensorProto.FLOAT
    assert types["relevance"].shape == original.graph.input[0].type.tensor_type.shape
    assert types["explained_class"].elem_type == TensorProto.INT64
    assert types["explained_logit"].elem_type == TensorProto.FLOAT
    onnx.checker.check_model(explainer, full_check=True)
    assert explainer.opset_import == original.opset_import  # opset 20 is kept


def test_outputs_equal_the_original_model(cnn_path, images):
    outputs, relevance = lrp_onnx.Explainer(cnn_path).explain(images)
    (expected,) = run_original(cnn_path, images)
    assert np.linalg.norm(outputs["logits"] - expected) <= 1e-6 * np.linalg.norm(expected)
    assert relevance.shape == images.shape and relevance.dtype == np.float32


def test_target_minus_one_is_the_predicted_class(cnn_path, images):
    explainer = lrp_onnx.Explainer(cnn_path)
    outputs, by_default = explainer.explain(images)
    _, explicit = explainer.explain(images, outputs["logits"].argmax(1))
    _, minus_one = explainer.explain(images, -1)
    np.testing.assert_array_equal(by_default, explicit)
    np.testing.assert_array_equal(minus_one, explicit)
    _, other = explainer.explain(images, [0, 1, 2])
    assert not np.allclose(other, explicit)


def test_explained_class_and_logit(cnn_path, images):
    run = lrp_onnx.Explainer(cnn_path).run(images, [-1, 3, 0])
    logits = run["logits"]
    expected_class = [logits[0].argmax(), 3, 0]
    np.testing.assert_array_equal(run["explained_class"], expected_class)
    np.testing.assert_allclose(run["explained_logit"], logits[np.arange(3), expected_class], rtol=1e-6)


def test_score_gives_run_s_class_and_logit_from_the_forward_pass_alone(cnn_path, images):
    from lrp_onnx.runtime import SCORE_OUTPUTS, pruned
    explainer = lrp_onnx.Explainer(cnn_path)
    for target in (None, [-1, 3, 0]):
        run, score = explainer.run(images, target), explainer.score(images, target)
        np.testing.assert_array_equal(score["explained_class"], run["explained_class"])
        np.testing.assert_allclose(score["explained_logit"], run["explained_logit"], rtol=1e-5, atol=1e-6)
    part = pruned(explainer.model, SCORE_OUTPUTS)
    onnx.checker.check_model(part, full_check=True)
    assert [o.name for o in part.graph.output] == list(SCORE_OUTPUTS)
    # the forward's nodes, and those that pick the class and its logit; none of the relevance pass
    forward = {n.name for n in onnx.load(cnn_path).graph.node}
    assert forward <= {n.name for n in part.graph.node}
    assert all(n.name in forward or n.name.startswith(("lrp/seed/", "lrp/explained_")) for n in part.graph.node)


def test_softmax_output_seeds_the_pre_softmax_logit(tmp_path, images):
    plain = export(small_cnn(), torch.randn(2, 3, 12, 12), str(tmp_path / "plain.onnx"), dynamo=False)
    with_softmax = export(small_cnn(softmax=True), torch.randn(2, 3, 12, 12), str(tmp_path / "soft.onnx"),
                          dynamo=False)
    _, relevance_plain = lrp_onnx.Explainer(plain).explain(images, [1, 2, 3])
    outputs, relevance_soft = lrp_onnx.Explainer(with_softmax).explain(images, [1, 2, 3])
    np.testing.assert_allclose(relevance_soft, relevance_plain, rtol=1e-5, atol=1e-7)
    (probabilities,) = run_original(with_softmax, images)
    np.testing.assert_allclose(outputs["logits"], probabilities, rtol=1e-6)
    np.testing.assert_allclose(outputs["logits"].sum(1), 1.0, rtol=1e-5)


def test_input_name_picks_another_float_input(images):
    """Two float inputs: the first is explained by default, --input picks the other."""
    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((2, 4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "w"], ["za"], name="ma"),
             helper.make_node("MatMul", ["b", "v"], ["zb"], name="mb"),
             helper.make_node("Relu", ["zb"], ["rb"], name="relu"),
             helper.make_node("Add", ["za", "rb"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4])
                                             for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(v, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a, b = np.ones((1, 4), np.float32), np.full((1, 4), 2.0, np.float32)
    _, relevance_a = lrp_onnx.Explainer(model).explain({"a": a, "b": b}, 0)
    explainer_b = lrp_onnx.Explainer(model, input_name="b")
    assert explainer_b.input_name == "b"
    _, relevance_b = explainer_b.explain({"a": a, "b": b}, 0)
    assert relevance_a.shape == relevance_b.shape == (1, 4)
    assert not np.allclose(relevance_a, relevance_b)
    with pytest.raises(lrp_onnx.UnsupportedModelError, match="'c' names no graph input and no tensor of the graph"):
        lrp_onnx.convert(model, input_name="c")


def test_old_opset_is_upgraded(tmp_path, images):
    path = str(tmp_path / "opset11.onnx")
    with torch.no_grad():
        torch.onnx.export(small_cnn(), torch.randn(2, 3, 12, 12), path, dynamo=False, opset_version=11,
                          input_names=["input"], output_names=["logits"])
    assert onnx.load(path).opset_import[0].version == 11
    explainer = lrp_onnx.convert(path)
    assert explainer.opset_import[0].version == 13
    outputs, relevance = lrp_onnx.Explainer(explainer).explain(images[:2])
    np.testing.assert_allclose(outputs["logits"], run_original(path, images[:2])[0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(relevance).all()


@pytest.mark.parametrize("composite", ["alpha-beta", "epsilon-gamma-box", "epsilon-plus-flat"])
def test_explainer_file_is_at_most_1_1_times_the_model(tmp_path, composite):
    import torchvision
    torch.manual_seed(0)
    path = export(torchvision.models.resnet18(weights=None).eval(), torch.randn(2, 3, 32, 32),
                  str(tmp_path / "resnet18.onnx"), dynamo=False)
    out = str(tmp_path / "resnet18.lrp.onnx")
    lrp_onnx.save_model(lrp_onnx.convert(path, composite), out)
    assert os.path.getsize(out) <= 1.1 * os.path.getsize(path)


def test_explain_with_a_plain_classifier_converts_in_memory(cnn_path, images):
    converted = lrp_onnx.convert(cnn_path, "epsilon", epsilon=0.1)
    _, from_explainer = lrp_onnx.Explainer(converted).explain(images, 1)
    _, from_classifier = lrp_onnx.Explainer(cnn_path, composite="epsilon", epsilon=0.1).explain(images, 1)
    np.testing.assert_array_equal(from_explainer, from_classifier)
    with pytest.raises(lrp_onnx.InputError, match="unknown input"):
        lrp_onnx.Explainer(converted).explain({"nope": images})


def test_unnamed_and_duplicate_nodes_get_unique_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="dup"),
             helper.make_node("Relu", ["b"], ["y"], name="dup")]
    graph = helper.make_graph(nodes, "unnamed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    p = lrp_onnx.plan(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    names = [u.name for u in p.units]
    assert names[0] == "Relu_0" and len(set(names)) == 3


def test_target_must_match_the_batch(cnn_path, images):
    with pytest.raises(lrp_onnx.InputError, match="one per sample"):
        lrp_onnx.Explainer(cnn_path).explain(images, [1, 2])

"""Attention (issue 13, first part): a hand-built single-head self-attention classifier under the
AttnLRP and CP-LRP composites, checked by invariants (CP-LRP conserves without biases; the chain
rule through attention equals torch autograd). The per-op rules are in test_ops.py's tables."""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx

RNG = np.random.default_rng(21)
T, D, CLASSES = 5, 8, 3
W = {name: (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
     for name, shape in {"wq": (D, D), "wk": (D, D), "wv": (D, D), "head": (D, CLASSES)}.items()}
SCALE = np.float32(1 / np.sqrt(D))


def attention_model(mask=None):
    """x [N, T, D] → softmax(q·kᵀ/√D (+ mask)) · v → mean over tokens → dense head, no biases."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale")]
    weights = {**W, "scale": SCALE, "axes": np.array([1], np.int64)}
    logits_in = "scaled"
    if mask is not None:
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"], name="mask"))
        weights["mask"] = mask
        logits_in = "masked"
    nodes += [helper.make_node("Softmax", [logits_in], ["attention"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["attention", "v"], ["context"], name="context"),
              helper.make_node("ReduceMean", ["context", "axes"], ["pooled"], name="pool", keepdims=0),
              helper.make_node("MatMul", ["pooled", "head"], ["y"], name="classifier")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


X = RNG.standard_normal((4, T, D)).astype(np.float32)


def test_cp_lrp_conserves_the_logit_without_biases():
    """Attention weights held constant, no biases: every step is a conserving ε-rule, Σ R = logit."""
    run = lrp_onnx.Explainer(attention_model(), composite="cp-lrp").run(X, [0, 1, 2, 0])
    np.testing.assert_allclose(run["relevance"].reshape(len(X), -1).sum(1), run["explained_logit"], rtol=1e-5)


def test_attnlrp_differs_from_cp_lrp_and_reaches_queries_and_keys():
    """AttnLRP gives half of the context's relevance to the attention weights, and through the
    softmax rule to q and k; CP-LRP gives them nothing."""
    model = attention_model()
    layers = ["q", "k", "v"]
    attn = lrp_onnx.Explainer(lrp_onnx.convert(model, "attnlrp", layers=layers)).run(X)
    cp = lrp_onnx.Explainer(lrp_onnx.convert(model, "cp-lrp", layers=layers)).run(X)
    assert np.abs(cp["relevance:q"]).max() == 0 and np.abs(cp["relevance:k"]).max() == 0
    assert np.abs(attn["relevance:q"]).max() > 0 and np.abs(attn["relevance:k"]).max() > 0
    # the value path gets half of what CP-LRP gives it: R_V = V ⊙ Aᵀ(R / (2·st(O)))
    np.testing.assert_allclose(attn["relevance:v"], cp["relevance:v"] / 2, rtol=1e-4, atol=1e-6)
    assert np.isfinite(attn["relevance"]).all()


def test_a_masked_token_gets_no_relevance_through_the_softmax():
    mask = np.zeros((1, T, T), np.float32)
    mask[..., T - 1] = -np.inf  # the last token is padding: nobody attends to it
    run = lrp_onnx.Explainer(lrp_onnx.convert(attention_model(mask), "attnlrp", layers=["k"])).run(X)
    assert np.isfinite(run["relevance"]).all()
    assert np.abs(run["relevance:k"][:, T - 1]).max() == 0


def test_the_chain_rule_through_attention_equals_autograd():
    """method=gradient through both bilinear MatMuls and the softmax: the transposes are the Jacobian's."""
    _, gradient = lrp_onnx.Explainer(attention_model(), method="gradient").explain(X, 1)
    x = torch.tensor(X, requires_grad=True)
    w = {k: torch.tensor(v) for k, v in W.items()}
    q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
    attention = torch.softmax(q @ k.transpose(1, 2) * float(SCALE), dim=-1)
    logits = (attention @ v).mean(1) @ w["head"]
    logits[:, 1].sum().backward()
    np.testing.assert_allclose(gradient, x.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("composite,rule", [("attnlrp", "epsilon(epsilon=1e-12)"),
                                            ("cp-lrp", "cp-epsilon(epsilon=1e-12)")])
def test_inspect_shows_the_rule_of_each_attention_node(composite, rule):
    p = lrp_onnx.plan(attention_model(), composite)
    assert p.rules["context"].describe() == rule
    assert p.rules["scores"].describe() == rule
    assert p.rules["softmax"].describe() == "epsilon(epsilon=1e-12)"
    assert not p.problems and not p.rule_problems

"""ONNX Runtime's fused transformer graphs (lrp_onnx/fused.py). A model after
``onnxruntime.transformers.optimizer.optimize_model`` is explained as the same model exported
without it; the attention ops the tiny exports do not produce are checked against the same
network written in standard ops, and their forward against ORT's own kernels. The per-op rows
(GELUs, the skip and simplified normalisations) are in test_ops.py."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters
import lrp_onnx

MICROSOFT = "com.microsoft"


def optimized(path, model_type, heads, hidden):
    from onnxruntime.transformers.optimizer import optimize_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden)
    out = str(path).replace(".onnx", ".opt.onnx")
    model.save_model_to_file(out)
    return out


def fused_ops(path):
    return {n.op_type for n in onnx.load(path).graph.node if n.domain == MICROSOFT}


def relative_l2(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def assert_explained_alike(plain, fused, feeds, targets, composites=("attnlrp", "cp-lrp")):
    """The fused model's explainer gives the unfused one's relevance (≤ 1e-5 relative L2), and its
    logits are the fused model's own run (to float rounding: the explainer computes them unfused)."""
    own = ort.InferenceSession(fused, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for composite in composites:
        reference = lrp_onnx.Explainer(plain, composite=composite).run(feeds, targets)
        ours = lrp_onnx.Explainer(fused, composite=composite).run(feeds, targets)
        assert np.abs(reference["relevance"]).sum() > 0
        assert relative_l2(ours["relevance"], reference["relevance"]) <= 1e-5, composite
        assert relative_l2(ours["logits"], own) <= 1e-5


# (model, exporter, TorchScript opset, the fused ops the optimizer writes into the tiny export)
TEXT = [("bert", "torchscript", 17, {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"}),
        # below opset 17 the LayerNorms are written out, as TorchScript exports them there
        ("roberta", "torchscript", 14, {"Attention", "SkipLayerNormalization", "BiasGelu"}),
        ("distilbert", "dynamo", None, {"EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"})]


@pytest.mark.parametrize("name,exporter,opset,ops", TEXT, ids=[f"{t[0]}-{t[1]}" for t in TEXT])
def test_optimized_text_model_is_explained_as_the_unoptimized(tmp_path, name, exporter, opset, ops):
    feeds, path = exporters.padded_tokens(), tmp_path / f"{name}.onnx"
    exporters.export_text(exporters.hf_text_model(name), feeds, str(path), exporter, opset=opset)
    config = exporters.hf_text_config(name)
    fused = optimized(path, "bert", config.get("num_attention_heads", config.get("n_heads")),
                      config.get("hidden_size", config.get("dim")))
    assert fused_ops(fused) == ops
    assert_explained_alike(str(path), fused, feeds, np.array([2, 1]))


def test_optimized_vit_is_explained_as_the_unoptimized(tmp_path):
    path = tmp_path / "vit.onnx"
    feeds = exporters.vision_transformer("hf ViT (tiny)", str(path), "torchscript")
    fused = optimized(path, "vit", 2, 16)
    assert fused_ops(fused) == {"SkipLayerNormalization", "BiasGelu"}
    assert_explained_alike(str(path), fused, feeds, np.array([3, 7]))


def test_optimized_bert_in_float16_is_explained_as_its_float32_form_with_the_rounded_weights(tmp_path):
    """optimize_model, then its float16 conversion (keep_io_types), as ORT's docs deploy a BERT on
    GPU: the expansions take the model's float16 type (a float32 constant would fail the checker),
    and the float32 mirror of the result explains as the optimized float32 model holding the
    weights the converter rounded. Its logits are the float16 run's to float16 rounding, the
    expansion's arithmetic not being the fused kernels'. Measured: relevance 4.8e-7 (attnlrp) and
    5.3e-7 (cp-lrp); logits 1.6e-3, three units of float16 roundoff."""
    feeds, path = exporters.padded_tokens(), tmp_path / "bert.onnx"
    exporters.export_text(exporters.hf_text_model("bert"), feeds, str(path), "torchscript", opset=17)
    config = exporters.hf_text_config("bert")
    fused = optimized(path, "bert", config["num_attention_heads"], config["hidden_size"])
    from onnxruntime.transformers.onnx_model import OnnxModel
    half = OnnxModel(onnx.load(fused))
    half.convert_float_to_float16(keep_io_types=True)
    half_path = str(tmp_path / "bert.fp16.onnx")
    half.save_model_to_file(half_path)
    halved = {t.name for t in half.model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    rounded = onnx.load(fused)
    for t in rounded.graph.initializer:
        if t.name in halved:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    own = ort.InferenceSession(half_path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for composite in ("attnlrp", "cp-lrp"):
        reference = lrp_onnx.Explainer(rounded, composite=composite).run(feeds, np.array([2, 1]))
        ours = lrp_onnx.Explainer(half_path, composite=composite).run(feeds, np.array([2, 1]))
        assert relative_l2(ours["relevance"], reference["relevance"]) <= 1e-5, composite
        assert relative_l2(ours["logits"], own) <= 2.0 ** -8


# --- attention forms the tiny exports do not produce, against the network in standard ops ------------

RNG = np.random.default_rng(29)
BATCH, TOKENS, HIDDEN, HEADS = 2, 5, 8, 2
WEIGHTS = {"wq": RNG.standard_normal((HIDDEN, HIDDEN)) / 3, "wk": RNG.standard_normal((HIDDEN, HIDDEN)) / 3,
           "wv": RNG.standard_normal((HIDDEN, HIDDEN)) / 3, "bias": RNG.standard_normal(3 * HIDDEN) / 3,
           "head": RNG.standard_normal((TOKENS * HIDDEN, 3)), "lengths": np.array([5, 3], np.int32)}
RAW_MASK = (np.arange(TOKENS) < WEIGHTS["lengths"][:, None]).astype(np.int32)


def model(nodes, weights, opset=17):
    """x [N, T, D] → nodes → a [N, T, D] → Flatten → Gemm → logits [N, 3]."""
    nodes = nodes + [helper.make_node("Flatten", ["a"], ["flat"]), helper.make_node("MatMul", ["flat", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [BATCH, TOKENS, HIDDEN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 3])],
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                               for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MICROSOFT, 1)])


def standard_attention(q, k, v, mask):
    """softmax(q·kᵀ/√d + mask)·v per head in standard ops, as an unfused export writes it."""
    def heads(t, perm):
        return [helper.make_node("Reshape", [t, "head_shape"], [t + "_h"]),
                helper.make_node("Transpose", [t + "_h"], [t + "_t"], perm=perm)]
    return heads(q, [0, 2, 1, 3]) + heads(k, [0, 2, 3, 1]) + heads(v, [0, 2, 1, 3]) + [
        helper.make_node("MatMul", [q + "_t", k + "_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "inverse_sqrt_d"], ["scaled"]),
        helper.make_node("Add", ["scaled", mask], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", v + "_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merged_shape"], ["a"])]


STANDARD = {"head_shape": np.array([0, 0, HEADS, -1], np.int64), "merged_shape": np.array([0, 0, -1], np.int64),
            "inverse_sqrt_d": np.float32(1 / np.sqrt(HIDDEN // HEADS)),
            "mask_bias": np.where(RAW_MASK, 0, -3.0e38).astype(np.float32)[:, None, None, :]}


def projections():
    """q, k, v = x·W + b in standard ops."""
    biases = {f"b{t}": WEIGHTS["bias"][i * HIDDEN:(i + 1) * HIDDEN] for i, t in enumerate("qkv")}
    nodes = [n for t in "qkv" for n in (helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}0"]),
                                        helper.make_node("Add", [f"{t}0", f"b{t}"], [t]))]
    return nodes, biases


FUSED_FORMS = {
    # Attention with a raw [N, T] mask, the packed weight [D, 3D]
    "Attention-raw-mask": [helper.make_node("Attention", ["x", "wqkv", "bias", "mask"], ["a"], domain=MICROSOFT,
                                            num_heads=HEADS)],
    # Attention with [N] valid lengths, as EmbedLayerNormalization's mask_index
    "Attention-lengths": [helper.make_node("Attention", ["x", "wqkv", "bias", "lengths"], ["a"], domain=MICROSOFT,
                                           num_heads=HEADS)],
    # MultiHeadAttention on separate projections, its bias added inside, a [N] key padding mask
    "MultiHeadAttention": [helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"] + [
        helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "lengths"], ["a"], domain=MICROSOFT,
                         num_heads=HEADS)],
}


@pytest.mark.parametrize("form", sorted(FUSED_FORMS))
def test_fused_attention_is_explained_as_standard_ops(form, rng):
    weights = dict(WEIGHTS, wqkv=np.concatenate([WEIGHTS["wq"], WEIGHTS["wk"], WEIGHTS["wv"]], 1), mask=RAW_MASK)
    fused = model(FUSED_FORMS[form], weights)  # the mask a constant: the model's one input stays x
    project, biases = projections()
    plain = model(project + standard_attention("q", "k", "v", "mask_bias"), {**WEIGHTS, **biases, **STANDARD})
    x = rng.standard_normal((BATCH, TOKENS, HIDDEN)).astype(np.float32)
    targets = np.array([0, 2])
    own = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    plain_logits = ort.InferenceSession(plain.SerializeToString()).run(None, {"x": x})[0]
    assert relative_l2(plain_logits, own) <= 1e-5  # the standard network is the fused one
    for composite in ("attnlrp", "cp-lrp"):
        reference = lrp_onnx.Explainer(plain, composite=composite).run({"x": x}, targets)
        ours = lrp_onnx.Explainer(fused, composite=composite).run({"x": x}, targets)
        assert relative_l2(ours["relevance"], reference["relevance"]) <= 1e-5, composite
        assert relative_l2(ours["logits"], own) <= 1e-5


def test_bias_add_runs_where_ort_has_no_kernel(rng):
    """ORT's CPU provider has no BiasAdd; the explainer, in standard ops, runs, and gives X + bias + skip's
    relevance: x + b + s with the skip s a constant is a shift, so R at x is R at the sum."""
    weights = {"b": rng.standard_normal(HIDDEN), "s": rng.standard_normal((BATCH, TOKENS, HIDDEN)),
               "head": WEIGHTS["head"]}
    fused = model([helper.make_node("BiasAdd", ["x", "b", "s"], ["a"], domain=MICROSOFT)], weights)
    x = rng.standard_normal((BATCH, TOKENS, HIDDEN)).astype(np.float32)
    run = lrp_onnx.Explainer(fused, composite="epsilon").run({"x": x}, [1, 2])
    a = (x + weights["b"] + weights["s"]).reshape(BATCH, -1)
    np.testing.assert_allclose(run["logits"], a @ WEIGHTS["head"], rtol=1e-5)
    expected = a * WEIGHTS["head"][:, [1, 2]].T  # the ε-rule at the head, R at the logit being the logit
    np.testing.assert_allclose(run["relevance"].reshape(BATCH, -1), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attrs,inputs,what", [
    ({"unidirectional": 1}, ["x", "wqkv", "bias"], "causal"),
    ({}, ["x", "wqkv", "bias", "", "past"], "key/value cache"),
])
def test_decoder_attention_is_refused_by_name(attrs, inputs, what):
    weights = dict(WEIGHTS, wqkv=np.ones((HIDDEN, 3 * HIDDEN)), past=np.zeros((2, BATCH, HEADS, 1, HIDDEN // HEADS)))
    fused = model([helper.make_node("Attention", inputs, ["a"], domain=MICROSOFT, num_heads=HEADS, **attrs)], weights)
    with pytest.raises(lrp_onnx.UnsupportedModelError, match=f"Attention.*{what}.*not supported"):
        lrp_onnx.convert(fused)

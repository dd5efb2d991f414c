"""Each supported op in isolation: a small model converted and run on ONNX Runtime, against a numpy
re-derivation (numpy_reference.py). One row per op × rule; adding an op is one row here."""

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
import numpy_reference as ref
import quantized_models as qm

# the cases' constants, drawn once at import; a test's own data come from its rng fixture (conftest.py)
RNG = np.random.default_rng(7)


KEPT_INTEGERS = (np.int8, np.uint8, np.int32)  # quantized weights, zero points and biases


def _initializers(arrays):
    """Float arrays as float32, quantized ones (int8, uint8, int32) as they are, other integer arrays
    (shapes, axes, indices) as int64."""
    def typed(v):
        v = np.asarray(v)
        return v.astype(np.float32 if v.dtype.kind == "f" else v.dtype if v.dtype in KEPT_INTEGERS else np.int64)
    return [numpy_helper.from_array(typed(v), k) for k, v in arrays.items()]


OPSETS = lambda opset: [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]  # noqa: E731


def run_explainer(nodes, x, initializers, seed, opset=17, rules=None, composite="epsilon", dynamic=False, **params):
    """Model x -> nodes -> z -> Flatten -> y, converted with ``rules`` and fed ``seed`` as R at y.
    ``dynamic``: x's sizes past the channel axis are symbolic, as in an image exported with dynamic
    height and width, so the explainer takes them from the run."""
    dims = ["N"] + list(x.shape[1:2]) + [f"d{k}" for k in range(2, x.ndim)] if dynamic else ["N"] + list(x.shape[1:])
    graph = helper.make_graph(
        nodes + [helper.make_node("Flatten", ["z"], ["y"], name="flatten")], "case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seed.shape[1]])],
        _initializers(initializers))
    model = helper.make_model(graph, opset_imports=OPSETS(opset))
    explainer = lrp_onnx.convert(model, composite, rules=rules, seed_input=True, **params)
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    y, relevance = session.run(["y", "relevance"], {"x": x, "relevance_seed": seed})
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = original.run(["y"], {"x": x})[0]  # the forward is untouched, up to ORT's fusion choices
    assert np.linalg.norm(y - expected) <= 1e-6 * np.linalg.norm(expected)
    return y, relevance


# --- linear layers × rules ------------------------------------------------------------------------

@dataclass
class Linear:
    id: str
    x_shape: tuple
    nodes: list
    weights: dict
    affine: Callable  # numpy z = M x + b for one sample
    structure: Optional[Callable] = None  # numpy forward with all-ones weights and no bias (flat rule)
    op: str = "Conv"
    # what the layer reads, from the model's input x: Relu(x) (the converter's non-negative-input
    # path), or x quantized and dequantized
    layer_input: Callable = lambda x: x


def after_relu(case):
    """The same layer reading Relu(x); Relu passes relevance, so R_x is the layer's R at Relu(x)."""
    relu = helper.make_node("Relu", ["x"], ["x_relu"], name="relu")
    nodes = [relu] + [helper.make_node(n.op_type, ["x_relu" if i == "x" else i for i in n.input], n.output,
                                       name=n.name, **{a.name: helper.get_attribute_value(a) for a in n.attribute})
                      for n in case.nodes]
    return Linear(case.id + "-after-relu", case.x_shape, nodes, case.weights, case.affine, case.structure, case.op,
                  lambda x: np.maximum(x, 0))


def _conv_case(id, x_shape, w_shape, attrs=None, bias=True, **np_attrs):
    w = RNG.standard_normal(w_shape)
    b = RNG.standard_normal(w_shape[0]) if bias else None
    inputs = ["x", "w"] + (["b"] if bias else [])
    weights = {"w": w, **({"b": b} if bias else {})}
    spatial = len(w_shape) - 2

    def affine(s):
        z = ref.conv(s, w, **np_attrs)
        return z + (b.reshape([-1] + [1] * spatial) if bias else 0)
    return Linear(id, x_shape, [helper.make_node("Conv", inputs, ["z"], name="layer", **(attrs or {}))], weights,
                  affine, lambda s: ref.conv(s, np.ones_like(w), **np_attrs))


def _gemm_case(id, trans_b, alpha=1.0, beta=1.0, bias=True):
    w = RNG.standard_normal((5, 6) if trans_b else (6, 5))
    c = RNG.standard_normal(5) if bias else None
    w_math = w.T if trans_b else w

    def affine(s):
        return alpha * s @ w_math + (beta * c if bias else 0)
    node = helper.make_node("Gemm", ["x", "w"] + (["c"] if bias else []), ["z"], name="layer", transB=trans_b,
                            alpha=alpha, beta=beta)
    return Linear(id, (6,), [node], {"w": w, **({"c": c} if bias else {})}, affine,
                  lambda s: s @ np.ones_like(w_math), op="Gemm")


CONV = _conv_case("conv2d", (2, 5, 5), (3, 2, 3, 3), {"pads": [1, 1, 1, 1]}, pads=[1, 1, 1, 1])
GEMM = _gemm_case("gemm-transB-alpha-beta", 1, alpha=0.5, beta=2.0)

LINEAR_CASES = [
    *[(CONV, rule, {}) for rule in ("epsilon", "alpha-beta", "zplus", "gamma", "flat", "wsquare", "norm")],
    (CONV, "alpha-beta", {"alpha": 1.5, "beta": 0.5}),
    (CONV, "gamma", {"gamma": 1.0}),
    (CONV, "epsilon", {"epsilon": 0.5}),
    (CONV, "zbox", {"low": -1.0, "high": 2.0}),
    (CONV, "zbox", {"low": [-1.0, -2.0], "high": [1.0, 0.5]}),
    *[(GEMM, rule, {}) for rule in ("epsilon", "alpha-beta", "zplus", "gamma", "flat", "wsquare")],
    (GEMM, "zbox", {"low": -3.0, "high": 3.0}),
    (_gemm_case("gemm-nobias", 0, bias=False), "zplus", {}),
    (_conv_case("conv-strided-dilated-grouped", (4, 9, 8), (6, 2, 3, 2), {"strides": [2, 3], "pads": [1, 0, 2, 1],
                "dilations": [2, 1], "group": 2}, strides=[2, 3], pads=[1, 0, 2, 1], dilations=[2, 1], group=2),
     "alpha-beta", {}),
    (_conv_case("conv-depthwise", (3, 6, 6), (3, 1, 3, 3), {"group": 3, "strides": [2, 2]}, group=3,
                strides=[2, 2]), "epsilon", {}),
    (_conv_case("conv1d", (2, 11), (4, 2, 3), {"strides": [2], "pads": [1, 1]}, strides=[2], pads=[1, 1]),
     "alpha-beta", {}),
    (_conv_case("conv3d", (2, 4, 4, 4), (2, 2, 2, 2, 2), {"pads": [1, 0, 0, 0, 1, 1]}, pads=[1, 0, 0, 0, 1, 1]),
     "gamma", {}),
    (_conv_case("conv-same-upper", (2, 7, 7), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                bias=False, strides=[2, 2], pads=[1, 1, 1, 1]), "alpha-beta", {}),
]


def _conv_transpose_case():
    w = RNG.standard_normal((2, 3, 3, 3))
    b = RNG.standard_normal(3)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["z"], name="layer", **attrs)
    return Linear("conv-transpose", (2, 3, 3), [node], {"w": w, "b": b},
                  lambda s: ref.conv_transpose(s, w, **attrs) + b.reshape(-1, 1, 1),
                  lambda s: ref.conv_transpose(s, np.ones_like(w), **attrs), op="ConvTranspose")


def _matmul_add_case():
    w, b = RNG.standard_normal((6, 4)), RNG.standard_normal(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"),
             helper.make_node("Add", ["m", "b"], ["z"], name="bias")]
    return Linear("matmul+add-3d", (3, 6), nodes, {"w": w, "b": b}, lambda s: s @ w + b, op="MatMul")


def _conv_bn_case():
    """Conv, then BatchNorm, then Mul/Add by per-channel constants: all merged into one linear layer."""
    w, b = RNG.standard_normal((3, 2, 3, 3)), RNG.standard_normal(3)
    gamma, beta, mean, var = RNG.uniform(0.5, 1.5, 3), RNG.standard_normal(3), RNG.standard_normal(3), \
        RNG.uniform(0.5, 1.5, 3)
    scale, shift = RNG.uniform(0.5, 2, (1, 3, 1, 1)), RNG.standard_normal((3, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="layer"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn",
                              epsilon=1e-3),
             helper.make_node("Mul", ["scale", "n"], ["s"], name="scale"),
             helper.make_node("Sub", ["s", "shift"], ["z"], name="shift")]

    def affine(x):
        c = ref.conv(x, w) + b.reshape(-1, 1, 1)
        n = (c - mean.reshape(-1, 1, 1)) / np.sqrt(var.reshape(-1, 1, 1) + 1e-3) * gamma.reshape(-1, 1, 1) \
            + beta.reshape(-1, 1, 1)
        return scale[0] * n - shift
    weights = dict(w=w, b=b, gamma=gamma, beta=beta, mean=mean, var=var, scale=scale, shift=shift)
    return Linear("conv+bn+mul+sub", (2, 5, 5), nodes, weights, affine)


LINEAR_CASES += [(after_relu(case), rule, params) for case, rule, params in [
    (CONV, "alpha-beta", {}), (CONV, "alpha-beta", {"alpha": 1.5, "beta": 0.5}), (CONV, "zplus", {}),
    (CONV, "gamma", {}), (CONV, "epsilon", {}), (GEMM, "alpha-beta", {}), (GEMM, "gamma", {"gamma": 0.5})]]
LINEAR_CASES += [(_conv_transpose_case(), rule, {}) for rule in ("epsilon", "alpha-beta", "flat")]
LINEAR_CASES += [(_matmul_add_case(), rule, {}) for rule in ("epsilon", "alpha-beta")]
LINEAR_CASES += [(_conv_bn_case(), rule, {}) for rule in ("epsilon", "alpha-beta", "wsquare")]


# --- quantized layers: a QOperator op between QuantizeLinear and DequantizeLinear, whose rule sees
# its float form: the dequantized input, the dequantized weights and its float result --------------

Q_SCALE, Q_ZERO = np.float32(0.02), np.uint8(128)  # uint8 activations over [-2.56, 2.54]
QUANTIZE = {"q_scale": Q_SCALE, "q_zero": Q_ZERO}


def qdq(x, scale=Q_SCALE, zero=Q_ZERO):
    """QuantizeLinear then DequantizeLinear in numpy: the value a layer reading the quantized x sees."""
    q = np.clip(np.rint(np.asarray(x, np.float32) / np.float32(scale)) + float(zero), 0, 255)
    return ((q - float(zero)) * np.float32(scale)).astype(np.float64)


def quantized(w, axis):
    """int8 weights and per-channel float32 scales along ``axis`` (zero point 0), and their float value."""
    scale = (np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)) / 127).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale, q.astype(np.float64) * scale.reshape(shape).astype(np.float64)


def _quantized_case(id, op, x_shape, operands, weights, affine, out_scale=0.05, domain="", **attrs):
    """x → QuantizeLinear → ``op``(quantized x, ``operands``..., output scale and zero point) →
    DequantizeLinear → z, the layer reading qdq(x)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"], name="quantize"),
             helper.make_node(op, ["qx", "q_scale", "q_zero", *operands], ["qz"], name="layer", domain=domain, **attrs),
             helper.make_node("DequantizeLinear", ["qz", "out_scale", "out_zero"], ["z"], name="dequantize")]
    weights = dict(weights, **QUANTIZE, out_scale=np.float32(out_scale), out_zero=np.uint8(128))
    return Linear(id, x_shape, nodes, weights, affine, op=op, layer_input=qdq)


def _qlinear_conv_case():
    w_q, w_scale, w = quantized(RNG.standard_normal((3, 2, 3, 3)), axis=0)
    bias = RNG.integers(-2000, 2000, 3).astype(np.int32)
    b = bias * (float(Q_SCALE) * w_scale.astype(np.float64))
    return _quantized_case("qlinearconv-per-channel", "QLinearConv", (2, 5, 5),
                           ["w_q", "w_scale", "w_zero", "out_scale", "out_zero", "bias"],
                           {"w_q": w_q, "w_scale": w_scale, "w_zero": np.zeros(3, np.int8), "bias": bias},
                           lambda s: ref.conv(s, w, pads=[1, 1, 1, 1]) + b.reshape(-1, 1, 1), pads=[1, 1, 1, 1])


def _qlinear_matmul_case():
    w_q, w_scale, w = quantized(RNG.standard_normal((6, 4)), axis=1)
    return _quantized_case("qlinearmatmul-per-column", "QLinearMatMul", (3, 6),
                           ["w_q", "w_scale", "w_zero", "out_scale", "out_zero"],
                           {"w_q": w_q, "w_scale": w_scale, "w_zero": np.zeros(4, np.int8)}, lambda s: s @ w)


def _qgemm_case():
    """QGemm computes alpha·(A·B + C) with C's scale a_scale·b_scale (ONNX Runtime's contrib op)."""
    w_q, w_scale, w = quantized(RNG.standard_normal((5, 6)), axis=0)
    c = RNG.integers(-2000, 2000, 5).astype(np.int32)
    c_float = c * (float(Q_SCALE) * w_scale.astype(np.float64))
    return _quantized_case("qgemm-transB-alpha", "QGemm", (6,),
                           ["w_q", "w_scale", "w_zero", "bias", "out_scale", "out_zero"],
                           {"w_q": w_q, "w_scale": w_scale, "w_zero": np.zeros(5, np.int8), "bias": c},
                           lambda s: 0.5 * (s @ w.T + c_float), domain="com.microsoft", transB=1, alpha=0.5)


LINEAR_CASES += [(case, rule, {}) for case in (_qlinear_conv_case(), _qlinear_matmul_case(), _qgemm_case())
                 for rule in ("epsilon", "alpha-beta")]


def dynamic_qdq(x):
    """DynamicQuantizeLinear then DequantizeLinear in numpy: uint8 over the whole batch's range, 0 included."""
    x = np.asarray(x, np.float32)
    low, high = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32((high - low) / np.float32(255))
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float64)


def _integer_case(id, op, x_shape, w, axis, affine_of, **attrs):
    """x → DynamicQuantizeLinear → ``op`` with int8 weights → Cast → Mul(x_scale · w_scale) → Add(bias):
    ONNX Runtime's dynamic quantization of a layer, which reads dynamic_qdq(x)."""
    # 7-bit weights, per tensor, as quantize_dynamic writes them with reduce_range=True: on CPUs without
    # VNNI, ONNX Runtime's u8s8 kernels add pairs of products in int16 with saturation (vpmaddubsw),
    # and 255·127·2 overflows it, so full-range weights give a CPU-dependent product
    w_scale = np.float32(np.abs(w).max() / 63)
    w_q = np.clip(np.rint(w / w_scale), -63, 63).astype(np.int8)
    bias = RNG.standard_normal(w.shape[axis])
    bias_shape = [-1] + [1] * (len(x_shape) - 1) if op == "ConvInteger" else [-1]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["qx", "x_scale", "x_zero"], name="quantize"),
             helper.make_node("Mul", ["x_scale", "w_scale"], ["scales"], name="scales"),
             helper.make_node(op, ["qx", "w_q", "x_zero"], ["acc"], name="layer", **attrs),
             helper.make_node("Cast", ["acc"], ["acc_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["acc_f", "scales"], ["scaled"], name="scale"),
             helper.make_node("Add", ["scaled", "bias"], ["z"], name="bias")]
    w_used = w_q.astype(np.float64) * float(w_scale)
    return Linear(id, x_shape, nodes, {"w_q": w_q, "w_scale": w_scale, "bias": bias.reshape(bias_shape)},
                  affine_of(w_used, bias), op=op, layer_input=dynamic_qdq)


def _nbits_case():
    """ONNX Runtime's MatMulNBits: K = 32 inputs in blocks of 16, N = 4 outputs, 4-bit weights with
    packed zero points, and its own bias input."""
    packed = RNG.integers(0, 256, (4, 2, 8)).astype(np.uint8)
    scales = RNG.uniform(0.05, 0.2, (4, 2)).astype(np.float32)
    zeros = RNG.integers(0, 256, (4, 1)).astype(np.uint8)
    bias = RNG.standard_normal(4)
    node = helper.make_node("MatMulNBits", ["x", "w_q", "w_scales", "w_zeros", "", "bias"], ["z"], name="layer",
                            domain="com.microsoft", K=32, N=4, bits=4, block_size=16)
    weights = {"w_q": packed, "w_scales": scales, "w_zeros": zeros, "bias": bias}
    w = qm.nbits_dequantized(node, {k: np.asarray(v) for k, v in weights.items()}).astype(np.float64)
    return Linear("matmulnbits-4bit", (32,), [node], weights, lambda s: s @ w + bias, op="MatMulNBits")


LINEAR_CASES += [(_nbits_case(), rule, {}) for rule in ("epsilon", "alpha-beta")]

LINEAR_CASES += [(case, rule, {}) for case in (
    _integer_case("convinteger", "ConvInteger", (2, 5, 5), RNG.standard_normal((3, 2, 3, 3)), 0,
                  lambda w, b: lambda s: ref.conv(s, w, pads=[1, 1, 1, 1]) + b.reshape(-1, 1, 1), pads=[1, 1, 1, 1]),
    _integer_case("matmulinteger", "MatMulInteger", (3, 6), RNG.standard_normal((6, 4)), 1,
                  lambda w, b: lambda s: s @ w + b)) for rule in ("epsilon", "alpha-beta")]


def _bound(value, x_shape):
    value = np.asarray(value, np.float64)
    if value.ndim == 1:
        value = value.reshape([-1] + [1] * (len(x_shape) - 1))
    return np.broadcast_to(value, x_shape).reshape(-1)


@pytest.mark.parametrize("case,rule,params", LINEAR_CASES,
                         ids=[f"{c.id}-{r}-{p}" if p else f"{c.id}-{r}" for c, r, p in LINEAR_CASES])
def test_linear_rule_matches_numpy(case, rule, params, rng):
    x = rng.standard_normal((2,) + case.x_shape).astype(np.float32)
    zero = np.zeros(case.x_shape)
    m = ref.dense_matrix(lambda s: case.affine(s) - case.affine(zero), case.x_shape)
    bias = case.affine(zero).reshape(-1)
    seed = rng.standard_normal((2, m.shape[0])).astype(np.float32)
    rule_obj = lrp_onnx.make_rule(rule, **params)
    _, relevance = run_explainer(case.nodes, x, case.weights, seed, rules={case.op: rule_obj})
    ones = ref.dense_matrix(case.structure, case.x_shape) if case.structure else None
    layer_input = case.layer_input(x)
    for n in range(2):
        expected = ref.lrp(rule, params, m, layer_input[n].reshape(-1).astype(np.float64), bias,
                           seed[n].astype(np.float64),
                           ones_matrix=ones, low=_bound(params.get("low", 0.0), case.x_shape),
                           high=_bound(params.get("high", 1.0), case.x_shape))
        np.testing.assert_allclose(relevance[n].reshape(-1), expected, rtol=2e-4,
                                   atol=2e-4 * np.abs(expected).max())


def test_conservation_of_bias_free_rules(rng):
    """Σ R_x = Σ R_z for a bias-free layer on non-negative (post-ReLU) inputs under alpha-beta and zplus.
    (The ε-rule's conservation is tested on whole ReLU networks, in test_conservation.py.)"""
    case = _conv_case("conv-nobias", (3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, bias=False)
    x = np.abs(rng.standard_normal((2,) + case.x_shape)).astype(np.float32)
    seed = rng.uniform(0.1, 1.0, (2, 4 * 36)).astype(np.float32)
    for rule in (lrp_onnx.AlphaBeta(), lrp_onnx.ZPlus(), lrp_onnx.AlphaBeta(1.5, 0.5)):
        _, relevance = run_explainer(case.nodes, x, case.weights, seed, rules={"Conv": rule})
        np.testing.assert_allclose(relevance.reshape(2, -1).sum(1), seed.sum(1), rtol=1e-5)


# --- everything else: fixed propagation or the base-map rule --------------------------------------

@dataclass
class Case:
    id: str
    x_shape: tuple
    nodes: list
    reference: Callable  # (x one sample, z one sample, R at z one sample) -> R at x
    weights: dict = field(default_factory=dict)
    opset: int = 17
    conserves: bool = True  # Σ R_x = Σ R_z exactly (routing and pass; not the stabilised norm splits)
    rtol: float = 1e-4  # against the float64 reference; wider only where the rule amplifies float32 rounding


def node(op, inputs, outputs=("z",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"{op.lower()}_{'_'.join(outputs)}", **attrs)


def passed(x, z, r):
    return r.reshape(x.shape)


def routed(np_forward):
    """Reference for a linear routing op: R_x = Jᵀ R_z with J the op's matrix."""
    def reference(x, z, r):
        return (ref.dense_matrix(np_forward, x.shape).T @ r.reshape(-1)).reshape(x.shape)
    return reference


def normed(x, z, r):
    """A sum of activations that are x itself: Σ_k x_k R / z = R·z/stabilize(z)."""
    return r * z / ref.stabilize(z, 1e-6)


def pooled(np_pool):
    def reference(x, z, r):
        m = ref.dense_matrix(np_pool, x.shape)
        return ref.lrp("norm", {}, m, x.reshape(-1), None, r.reshape(-1)).reshape(x.shape)
    return reference


SHAPE = (3, 6, 6)
LN_BIAS = RNG.standard_normal(6)
LN_SCALE2 = np.random.default_rng(13).uniform(0.5, 2, (6, 6))  # not from RNG: the other cases' data stay as they were
SOFTMAX_MASK = np.where(np.arange(6) == 4, -np.inf, 0.0) * np.ones((6, 1))
ACTIVATION_CASES = [Case(op, SHAPE, [node(op, ["x"], **attrs)], passed, opset=opset) for op, attrs, opset in [
    ("Relu", {}, 17), ("LeakyRelu", {"alpha": 0.1}, 17), ("Sigmoid", {}, 17), ("Tanh", {}, 17), ("Elu", {}, 17),
    ("Selu", {}, 17), ("Softplus", {}, 17), ("HardSigmoid", {}, 17), ("HardSwish", {}, 17), ("Softsign", {}, 17),
    ("Celu", {}, 17), ("Gelu", {}, 20), ("Mish", {}, 18), ("LRN", {"size": 3}, 17)]]

CASES = ACTIVATION_CASES + [
    Case("Clip", SHAPE, [node("Clip", ["x", "lo", "hi"])], passed, {"lo": np.float32(0), "hi": np.float32(6)}),
    Case("PRelu", SHAPE, [node("PRelu", ["x", "slope"])], passed, {"slope": np.full((3, 1, 1), 0.2)}),
    Case("Add-two-activations", SHAPE, [node("Relu", ["x"], ["a"]), node("Sigmoid", ["x"], ["s"]),
                                        node("Add", ["a", "s"])], normed, conserves=False),
    Case("Sub-two-activations", SHAPE, [node("Relu", ["x"], ["a"]), node("Sigmoid", ["x"], ["s"]),
                                        node("Sub", ["a", "s"])], normed, conserves=False),
    Case("Sum-three", SHAPE, [node("Relu", ["x"], ["a"]), node("Tanh", ["x"], ["t"]), node("Sum", ["a", "t", "x"])],
         normed, conserves=False),
    Case("SiLU-pattern", SHAPE, [node("Sigmoid", ["x"], ["g"]), node("Mul", ["x", "g"])], passed),
    Case("GELU-erf-pattern", SHAPE, [node("Div", ["x", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]),
                                     node("Add", ["e", "one"], ["p"]), node("Mul", ["x", "p"], ["m"]),
                                     node("Mul", ["m", "half"])], passed,
         {"sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}),
    Case("Add-constant", SHAPE, [node("Add", ["x", "c"])], passed, {"c": RNG.standard_normal(SHAPE)}),
    Case("Mul-constant", SHAPE, [node("Mul", ["c", "x"])], passed, {"c": RNG.standard_normal((6, 1))}),
    Case("Div-constant", SHAPE, [node("Div", ["x", "c"])], passed, {"c": np.float32(3)}),
    Case("BatchNormalization-unmerged", SHAPE, [node("BatchNormalization", ["x", "g", "b", "m", "v"])], passed,
         {"g": RNG.uniform(0.5, 2, 3), "b": RNG.standard_normal(3), "m": RNG.standard_normal(3), "v": np.ones(3)}),
    Case("Identity", SHAPE, [node("Identity", ["x"])], passed),
    Case("Dropout", SHAPE, [node("Dropout", ["x"])], passed),
    Case("Cast", SHAPE, [node("Cast", ["x"], to=TensorProto.FLOAT)], passed),
    Case("Reshape", SHAPE, [node("Reshape", ["x", "shape"])], passed, {"shape": np.array([0, 9, -1], np.int64)}),
    Case("Flatten", SHAPE, [node("Flatten", ["x"])], passed),
    # Keras/tf2onnx flatten: the target shape is computed from Shape(x) at run time, and gets no relevance.
    Case("Reshape-from-Shape", SHAPE, [node("Shape", ["x"], ["s"]), node("Gather", ["s", "first"], ["n"]),
                                       node("Concat", ["n", "rest"], ["shape"], axis=0),
                                       node("Reshape", ["x", "shape"])], passed,
         {"first": np.array([0], np.int64), "rest": np.array([-1], np.int64)}),
    Case("Squeeze-Unsqueeze", SHAPE, [node("Unsqueeze", ["x", "ax"], ["u"]), node("Squeeze", ["u", "ax"])], passed,
         {"ax": np.array([2], np.int64)}),
    Case("Transpose", SHAPE, [node("Transpose", ["x"], perm=[0, 3, 1, 2])],
         routed(lambda s: s.transpose(2, 0, 1))),
    Case("Concat", SHAPE, [node("Relu", ["x"], ["a"]), node("Concat", ["a", "x", "a"], axis=2)],
         lambda x, z, r: r[:, 0:6] + r[:, 6:12] + r[:, 12:18]),
    Case("Split", SHAPE, [node("Split", ["x", "sizes"], ["p", "q"], axis=2), node("Concat", ["q", "p"], axis=2)],
         routed(lambda s: np.concatenate([s[:, 2:], s[:, :2]], axis=1)), {"sizes": np.array([2, 4], np.int64)}),
    Case("Split-one-piece-used", SHAPE, [node("Split", ["x", "sizes"], ["p", "q"], axis=2), node("Relu", ["q"])],
         routed(lambda s: s[:, 2:]), {"sizes": np.array([2, 4], np.int64)}, conserves=False),
    Case("Slice", SHAPE, [node("Slice", ["x", "st", "en", "ax"])], routed(lambda s: s[:, 1:-1, -4:]),
         {"st": np.array([1, -4], np.int64), "en": np.array([-1, 100], np.int64), "ax": np.array([2, 3], np.int64)},
         conserves=False),
    # Swin's patch merging reads x[:, 0::2, 1::2]; a negative step reads backwards
    Case("Slice-step-2", SHAPE, [node("Slice", ["x", "st", "en", "ax", "steps"])], routed(lambda s: s[:, 0::2, 1::2]),
         {"st": np.array([0, 1], np.int64), "en": np.array([100, 100], np.int64), "ax": np.array([2, 3], np.int64),
          "steps": np.array([2, 2], np.int64)}, conserves=False),
    Case("Slice-negative-step", SHAPE, [node("Slice", ["x", "st", "en", "ax", "steps"])],
         routed(lambda s: s[:, 1:, ::-2]),
         {"st": np.array([1, -1], np.int64), "en": np.array([100, np.iinfo(np.int64).min], np.int64), "ax": np.array([2, 3], np.int64),
          "steps": np.array([1, -2], np.int64)}, conserves=False),
    Case("Pad", SHAPE, [node("Pad", ["x", "pads"])],
         routed(lambda s: np.pad(s, [(0, 0), (1, 2), (0, 1)])),
         {"pads": np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64)}, conserves=False),
    Case("Gather-scalar", SHAPE, [node("Gather", ["x", "i"], axis=2)], routed(lambda s: s[:, 4]),
         {"i": np.array(-2, np.int64)}, conserves=False),
    Case("Gather-repeated", SHAPE, [node("Gather", ["x", "i"], axis=1)], routed(lambda s: s[[2, 0, 2]]),
         {"i": np.array([2, 0, 2], np.int64)}, conserves=False),
    # indices computed at run time (the dynamo exporter's as_strided): swap neighbours, x_flat[l ^ 1]
    Case("Gather-computed-indices", SHAPE,
         [node("Reshape", ["x", "flat"], ["xf"]), node("Size", ["x"], ["n"]), node("Range", ["zero", "n", "one"], ["l"]),
          node("BitwiseXor", ["l", "one"], ["i"]), node("Gather", ["xf", "i"], ["zf"], axis=0),
          node("Reshape", ["zf", "shape"])],
         routed(lambda s: s.reshape(-1, 2)[:, ::-1].reshape(s.shape)),
         {"flat": np.array([-1], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
          "shape": np.array((-1,) + SHAPE, np.int64)}, opset=18),
    Case("MaxPool-overlapping", SHAPE, [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                              pads=[1, 1, 1, 1])],
         lambda x, z, r: ref.max_pool_routing(x, r, [3, 3], [2, 2], [1, 1])),
    Case("MaxPool-opset13", SHAPE, [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])],
         lambda x, z, r: ref.max_pool_routing(x, r, [2, 2], [2, 2], [0, 0]), opset=13),
    # x − 1 through a Relu is mostly 0: many windows tie, some over the padding, and the first 0 wins
    Case("MaxPool-ties", SHAPE, [node("Sub", ["x", "one"], ["s"]), node("Relu", ["s"], ["a"]),
                                 node("MaxPool", ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
         lambda x, z, r: ref.max_pool_routing(np.maximum(x - 1, 0), r, [3, 3], [1, 1], [1, 1]),
         {"one": np.array(1.0, np.float32)}),
    Case("MaxPool-ceil-mode", SHAPE, [node("MaxPool", ["x"], kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)],
         lambda x, z, r: ref.max_pool_routing(x, r, [3, 2], [2, 2], [0, 0])),
    Case("MaxPool-dilated", SHAPE, [node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 1], strides=[1, 2],
                                         pads=[0, 1, 1, 0])],
         lambda x, z, r: ref.max_pool_routing(x, r, [2, 2], [1, 2], [0, 1], [2, 1])),
    # stride above the kernel: some rows are in no window, some phases get no view
    Case("MaxPool-gaps", SHAPE, [node("MaxPool", ["x"], kernel_shape=[2, 1], strides=[3, 2])],
         lambda x, z, r: ref.max_pool_routing(x, r, [2, 1], [3, 2], [0, 0])),
    Case("MaxPool-same-upper", SHAPE, [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                            auto_pad="SAME_UPPER")],
         lambda x, z, r: ref.max_pool_routing(x, r, [3, 3], [2, 2], [0, 0])),
    Case("MaxPool-1d", (4, 9), [node("MaxPool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 0])],
         lambda x, z, r: ref.max_pool_routing(x, r, [3], [2], [1])),
    Case("GlobalMaxPool", SHAPE, [node("GlobalMaxPool", ["x"])],
         lambda x, z, r: ref.max_pool_routing(x, r, [6, 6], [1, 1], [0, 0])),
    Case("AveragePool", SHAPE, [node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])],
         pooled(lambda s: ref.average_pool(s, [2, 2], [2, 2], [0, 0, 0, 0], 1)), conserves=False),
    Case("AveragePool-pads-exclude", SHAPE, [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                                  pads=[1, 1, 1, 1])],
         pooled(lambda s: ref.average_pool(s, [3, 3], [2, 2], [1, 1, 1, 1], 0)), conserves=False),
    Case("AveragePool-pads-include", SHAPE, [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                                  pads=[1, 1, 1, 1], count_include_pad=1)],
         pooled(lambda s: ref.average_pool(s, [3, 3], [2, 2], [1, 1, 1, 1], 1)), conserves=False),
    Case("GlobalAveragePool", SHAPE, [node("GlobalAveragePool", ["x"])], pooled(lambda s: s.mean((1, 2))), conserves=False),
    Case("ReduceMean-keepdims0", SHAPE, [node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)],
         pooled(lambda s: s.mean((1, 2))), conserves=False),
    Case("ReduceSum-opset18", SHAPE, [node("ReduceSum", ["x", "ax"])], pooled(lambda s: s.sum(2, keepdims=True)),
         {"ax": np.array([-1], np.int64)}, opset=18, conserves=False),
    Case("LayerNormalization", SHAPE, [node("LayerNormalization", ["x", "ln_scale", "ln_bias"], axis=-1)],
         lambda x, z, r: ref.layer_norm_rule(x, z, r, LN_SCALE, 1e-6),
         {"ln_scale": (LN_SCALE := RNG.uniform(0.5, 2, 6)), "ln_bias": LN_BIAS}, conserves=False),
    Case("LayerNormalization-two-axes", SHAPE, [node("LayerNormalization", ["x", "ln_scale2"], axis=-2)],
         lambda x, z, r: ref.layer_norm_rule(x, z, r, LN_SCALE2, 1e-6, axes=(-2, -1)), {"ln_scale2": LN_SCALE2},
         conserves=False),
    # TorchScript's LayerNorm below opset 17: the centring is a sum whose mean's share returns through
    # the ReduceMean; √(var + eps) divides it wholly (a normalisation), γ scales, and here (alpha-beta)
    # R passes the β Add 1:1. Up to ε that is the fused rule (test_lxt compares it with LXT under attnlrp)
    Case("LayerNormalization-decomposed", SHAPE,
         [node("ReduceMean", ["x"], ["mean"], axes=[-1]), node("Sub", ["x", "mean"], ["c"]),
          node("Pow", ["c", "two_f"], ["sq"]), node("ReduceMean", ["sq"], ["var"], axes=[-1]),
          node("Add", ["var", "ln_eps"], ["var_eps"]), node("Sqrt", ["var_eps"], ["sigma"]),
          node("Div", ["c", "sigma"], ["normed"]), node("Mul", ["normed", "ln_scale"], ["scaled"]),
          node("Add", ["scaled", "ln_bias"])],
         lambda x, z, r: ref.centred_rule(x, r, 1e-6),
         {"two_f": np.array(2.0, np.float32), "ln_eps": np.array(1e-5, np.float32), "ln_scale": LN_SCALE,
          "ln_bias": LN_BIAS}, conserves=False,
         # R / st(x − mean): the test's x has an element 8e-5 from its row's mean, where float32's rounding of
         # x − mean (3e-5 relative) is amplified onto the whole row (measured 1.5e-4)
         rtol=5e-4),
    # RMSNorm as Llama writes it, x·rsqrt(mean(x²) + eps)·w: the normaliser is a gate of x, so R passes
    # to x unchanged (LXT's identity rule for RMSNorm)
    Case("RMSNorm-decomposed", SHAPE,
         [node("Pow", ["x", "two_f"], ["sq"]), node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
          node("Add", ["ms", "ln_eps"], ["ms_eps"]), node("Sqrt", ["ms_eps"], ["rms"]),
          node("Reciprocal", ["rms"], ["inv"]), node("Mul", ["x", "inv"], ["normed"]), node("Mul", ["normed", "w"])],
         passed, {"two_f": np.array(2.0, np.float32), "ln_eps": np.array(1e-6, np.float32), "w": LN_BIAS}),
    Case("RMSNormalization", SHAPE, [node("RMSNormalization", ["x", "w"], axis=-1)], passed, {"w": LN_BIAS},
         opset=23),
    Case("LpNormalization", SHAPE, [node("LpNormalization", ["x"], axis=1, p=2)], passed),
    Case("InstanceNormalization", SHAPE, [node("InstanceNormalization", ["x", "in_scale", "in_bias"], epsilon=1e-3)],
         lambda x, z, r: ref.group_norm_rule(x, z, r, IN_SCALE, 3, 1e-6, eps=1e-3),
         {"in_scale": (IN_SCALE := RNG.uniform(0.5, 2, 3)), "in_bias": RNG.standard_normal(3)}, conserves=False),
    # opset 21's form, scale and bias per channel (the ONNX checker refuses opset 18's, per group, as deprecated)
    Case("GroupNormalization", (4, 5, 5), [node("GroupNormalization", ["x", "gn_scale4", "gn_bias4"],
                                                num_groups=2)],
         lambda x, z, r: ref.group_norm_rule(x, z, r, GN_SCALE4, 2, 1e-6),
         {"gn_scale4": (GN_SCALE4 := RNG.uniform(0.5, 2, 4)), "gn_bias4": RNG.standard_normal(4)}, opset=21,
         conserves=False),
    # torch.onnx's GroupNorm below opset 18: instance norm over the grouped view with γ = 1 and β = 0,
    # then the per-channel scale and shift, which pass R on 1:1 (alpha-beta's base map)
    Case("GroupNorm-written-out", (4, 5, 5),
         [node("Reshape", ["x", "groups"], ["g"]), node("InstanceNormalization", ["g", "ones2", "zeros2"], ["n"]),
          node("Reshape", ["n", "back"], ["nb"]), node("Mul", ["nb", "gn_w"], ["m"]), node("Add", ["m", "gn_b"])],
         lambda x, z, r: ref.group_norm_rule(x, _group_normalised(x, 2), r, np.ones(4), 2, 1e-6),
         {"groups": np.array([0, 2, -1], np.int64), "ones2": np.ones(2), "zeros2": np.zeros(2),
          "back": np.array([-1, 4, 5, 5], np.int64), "gn_w": RNG.uniform(0.5, 2, (4, 1, 1)),
          "gn_b": RNG.standard_normal((4, 1, 1))}, conserves=False),
    Case("Expand", (3, 1, 6), [node("Expand", ["x", "to"])], routed(lambda s: np.broadcast_to(s, (3, 4, 6))),
         {"to": np.array([1, 3, 4, 6], np.int64)}),
    # indices computed at run time, repeated in pairs: row l of x as [-1, 6] reads (i, i % 6), i = l - l % 2;
    # opset 13, so the scatter-add of the backward needs the upgrade to 16
    Case("GatherND-computed-indices", SHAPE,
         [node("Reshape", ["x", "rows"], ["xr"]), node("Size", ["x"], ["n"]), node("Div", ["n", "six"], ["m"]),
          node("Range", ["zero", "m", "one"], ["l"]), node("Unsqueeze", ["l", "last"], ["lc"]),
          node("Mod", ["lc", "two"], ["odd"]), node("Sub", ["lc", "odd"], ["i"]), node("Mod", ["i", "six"], ["j"]),
          node("Concat", ["i", "j"], ["ij"], axis=1), node("GatherND", ["xr", "ij"], ["zf"]),
          node("Reshape", ["zf", "shape"])],
         routed(lambda s: s.reshape(18, 6)[np.arange(18) // 2 * 2, np.arange(18) // 2 * 2 % 6]),
         {"rows": np.array([-1, 6], np.int64), "six": np.array(6, np.int64), "zero": np.array(0, np.int64),
          "one": np.array(1, np.int64), "last": np.array([1], np.int64), "two": np.array(2, np.int64),
          "shape": np.array([-1, 18], np.int64)}, opset=13),
    # channel 1 <- channel 2, channel -1 (2) <- channel 0: data and updates both carry relevance
    Case("ScatterND", SHAPE,
         [node("Transpose", ["x"], ["t"], perm=[1, 2, 0, 3]), node("Gather", ["t", "src"], ["u"], axis=0),
          node("ScatterND", ["t", "dst", "u"], ["s"]), node("Transpose", ["s"], perm=[2, 0, 1, 3])],
         routed(lambda s: s[[0, 2, 0]]), {"src": np.array([2, 0], np.int64), "dst": np.array([[1], [-1]], np.int64)}),
    # a gated MLP's a ⊙ b, neither computed from the other: each factor gets R/2 by the ε-rule
    Case("Mul-two-activations", SHAPE, [node("Relu", ["x"], ["a"]), node("Sigmoid", ["x"], ["s"]),
                                        node("Mul", ["a", "s"])], normed, conserves=False),
    # the same with factors from different channels of x (a = relu(x₀), b = sigmoid(x₁)), so that each
    # factor's share lands apart: R_x₀ = R_x₁ = a·b·R / (2·st(a·b)), channel 2 none
    Case("Mul-two-activations-apart", SHAPE,
         [node("Slice", ["x", "c0", "c1", "cax"], ["x0"]), node("Slice", ["x", "c1", "c2", "cax"], ["x1"]),
          node("Relu", ["x0"], ["a"]), node("Sigmoid", ["x1"], ["b"]), node("Mul", ["a", "b"])],
         lambda x, z, r: np.concatenate([np.repeat(r * z / (2 * ref.stabilize(z, 1e-6)), 2, axis=0),
                                         np.zeros_like(r)]),
         {"c0": np.array([0], np.int64), "c1": np.array([1], np.int64), "c2": np.array([2], np.int64),
          "cax": np.array([1], np.int64)}, conserves=False),
    # attention scores Q·Kᵀ with K broadcast along the head axis: Q = sigmoid(x), K its head 0 (positive,
    # so that no score is near 0, where float32 would amplify rounding)
    Case("MatMul-two-activations-broadcast", SHAPE,
         [node("Sigmoid", ["x"], ["q"]), node("Slice", ["q", "h0", "h1", "hax"], ["k"]),
          node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"])],
         lambda x, z, r: ref.bilinear_scores(1 / (1 + np.exp(-x)), r, 1e-6),
         {"h0": np.array([0], np.int64), "h1": np.array([1], np.int64), "hax": np.array([1], np.int64)},
         conserves=False),
    # MaxViT's attention scores as an Einsum of two activations, here one tensor in both places
    Case("Einsum-two-activations", SHAPE,
         [node("Sigmoid", ["x"], ["q"]), node("Einsum", ["q", "q"], equation="nhid,nhjd->nhij")],
         lambda x, z, r: ref.self_scores(1 / (1 + np.exp(-x)), r, 1e-6), conserves=False, opset=17),
    # softmax over the last axis after a mask with −inf (a padded token), AttnLRP's rule; the Mul keeps it
    # from being the final softmax, below which relevance would start
    Case("Softmax-masked", SHAPE, [node("Add", ["x", "mask"], ["m"]), node("Softmax", ["m"], ["s"], axis=-1),
                                   node("Mul", ["s", "one"])],
         lambda x, z, r: ref.softmax_rule(x + SOFTMAX_MASK, r, 1e-6), {"mask": SOFTMAX_MASK, "one": np.float32(1)},
         conserves=False),
    # x where the mask is set, else x's last column broadcast along the row
    Case("Where", SHAPE,
         [node("Constant", [], ["mask"], value=numpy_helper.from_array(np.tri(6, dtype=bool))),
          node("Slice", ["x", "st", "en", "ax"], ["c"]), node("Where", ["mask", "x", "c"])],
         routed(lambda s: np.where(np.tri(6, dtype=bool), s, s[:, :, -1:])),
         {"st": np.array([-1], np.int64), "en": np.array([6], np.int64), "ax": np.array([3], np.int64)}),
]


def _quantized(op, operands=(), out_scale=0.05, **attrs):
    """x → QuantizeLinear → ``op`` (ONNX Runtime's contrib op) on it, then DequantizeLinear → z."""
    return [node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"]),
            node(op, ["qx", "q_scale", "q_zero", *operands, "out_scale", "out_zero"], ["qz"], domain="com.microsoft",
                 **attrs),
            node("DequantizeLinear", ["qz", "out_scale", "out_zero"])]


OUT = dict(QUANTIZE, out_scale=np.float32(0.05), out_zero=np.uint8(128))


def _group_normalised(x, groups, eps=1e-5):
    """x [C, …] normalised per group of channels, in float64."""
    xg = x.reshape(groups, -1)
    return ((xg - xg.mean(axis=1, keepdims=True)) / np.sqrt(xg.var(axis=1, keepdims=True) + eps)).reshape(x.shape)


def on_qdq(reference):
    """A reference for the layer reading qdq(x) instead of x."""
    return lambda x, z, r: reference(qdq(x), z, r)


def _positive(nodes):
    """``nodes`` reading sigmoid(x) where they read x."""
    return [node("Sigmoid", ["x"], ["sx"])] + [helper.make_node(
        n.op_type, ["sx" if i == "x" else i for i in n.input], n.output, name=n.name, domain=n.domain,
        **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]


def on_positive_qdq(reference):
    return lambda x, z, r: reference(qdq(1 / (1 + np.exp(-x))), z, r)


CASES += [
    Case("QuantizeLinear-DequantizeLinear", SHAPE, [node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"]),
                                                    node("DequantizeLinear", ["qx", "q_scale", "q_zero"])],
         passed, QUANTIZE),
    Case("DynamicQuantizeLinear", SHAPE, [node("DynamicQuantizeLinear", ["x"], ["qx", "s", "zp"]),
                                          node("DequantizeLinear", ["qx", "s", "zp"])], passed),
    Case("QLinearSigmoid", SHAPE, _quantized("QLinearSigmoid"), passed, OUT),
    Case("QLinearLeakyRelu", SHAPE, _quantized("QLinearLeakyRelu", alpha=0.1), passed, OUT),
    # one tensor twice: R_x = 2x·R / st(2x), x the dequantized input and 2x the float sum
    Case("QLinearAdd-same-tensor", SHAPE, _quantized("QLinearAdd", ["qx", "q_scale", "q_zero"]),
         lambda x, z, r: normed(x, 2 * qdq(x), r), OUT, conserves=False),
    Case("QLinearMul-constant", SHAPE, _quantized("QLinearMul", ["c_q", "c_scale", "c_zero"]), passed,
         dict(OUT, c_q=RNG.integers(0, 255, (6, 1)).astype(np.uint8), c_scale=np.float32(0.01),
              c_zero=np.uint8(128))),
    # a scalar quantized constant (a GELU's 0.5 in a QOperator transformer) dequantizes to a 0-d array
    Case("QLinearMul-scalar-constant", SHAPE, _quantized("QLinearMul", ["c_q0", "c_scale", "c_zero"]), passed,
         dict(OUT, c_q0=np.uint8(200), c_scale=np.float32(0.01), c_zero=np.uint8(128))),
    # GELU as ONNX Runtime's QOperator quantizer writes it (vit_b_16): the gate Φ(x) = (1 + erf(x/√2))/2
    # is computed in float between a DequantizeLinear and a QuantizeLinear, then QLinearMul(x, gate):
    # the gate is found through the quantized operands, so all of R passes to x and Erf needs no rule
    Case("QLinearMul-GELU-gate", SHAPE,
         [node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"]),
          node("DequantizeLinear", ["qx", "q_scale", "q_zero"], ["dx"]),
          node("Div", ["dx", "sqrt2"], ["scaled"]), node("Erf", ["scaled"], ["erf"]),
          node("QuantizeLinear", ["erf", "erf_scale", "erf_zero"], ["q_erf"]),
          node("QLinearAdd", ["q_erf", "erf_scale", "erf_zero", "one_q", "one_scale", "erf_zero", "cdf_scale",
                              "cdf_zero"], ["q_cdf"], domain="com.microsoft"),
          node("QLinearMul", ["qx", "q_scale", "q_zero", "q_cdf", "cdf_scale", "cdf_zero", "out_scale", "out_zero"],
               ["qz"], domain="com.microsoft"),
          node("DequantizeLinear", ["qz", "out_scale", "out_zero"])],
         passed, dict(OUT, sqrt2=np.float32(np.sqrt(2)), erf_scale=np.float32(1 / 127), erf_zero=np.uint8(128),
                      one_q=np.uint8(255), one_scale=np.float32(1 / 127), cdf_scale=np.float32(2 / 255),
                      cdf_zero=np.uint8(0))),
    Case("QLinearConcat", SHAPE,
         [node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"]),
          node("QLinearConcat", ["out_scale", "out_zero", "qx", "q_scale", "q_zero", "qx", "q_scale", "q_zero"], ["qz"],
               domain="com.microsoft", axis=2),
          node("DequantizeLinear", ["qz", "out_scale", "out_zero"])],
         lambda x, z, r: r[:, 0:6] + r[:, 6:12], OUT),
    # pooled over positive values (a sigmoid's, which passes R): a window summing to near 0 would make
    # the split ill-conditioned, R/z amplifying float32 rounding
    Case("QLinearAveragePool", SHAPE, _positive(_quantized("QLinearAveragePool", kernel_shape=[2, 2], strides=[2, 2])),
         on_positive_qdq(pooled(lambda s: ref.average_pool(s, [2, 2], [2, 2], [0, 0, 0, 0], 1))), OUT,
         conserves=False),
    Case("QLinearGlobalAveragePool", SHAPE, _positive(_quantized("QLinearGlobalAveragePool")),
         on_positive_qdq(pooled(lambda s: s.mean((1, 2)))), OUT, conserves=False),
    # the softmax's own output is quantized to [0, 1): scale 1/256, zero point 0
    Case("QLinearSoftmax", SHAPE,
         [node("QuantizeLinear", ["x", "q_scale", "q_zero"], ["qx"]),
          node("QLinearSoftmax", ["qx", "q_scale", "q_zero", "p_scale", "p_zero"], ["qs"], domain="com.microsoft",
               axis=-1, opset=13),
          node("DequantizeLinear", ["qs", "p_scale", "p_zero"], ["s"]), node("Mul", ["s", "one"])],
         lambda x, z, r: ref.softmax_rule(qdq(x), r, 1e-6),
         dict(QUANTIZE, p_scale=np.float32(1 / 256), p_zero=np.uint8(0), one=np.float32(1)), conserves=False),
]

# ONNX Runtime's fused ops (fused.py writes each out in standard ops). ORT runs the original, so
# run_explainer's forward check is against ORT's own kernels. The residual and bias are constants
# here: shifts, through which R passes. Constants from their own generator: the cases above keep their data.
FUSED_RNG = np.random.default_rng(29)
TOKENS = (6, 8)  # [sequence, hidden] per sample
FUSED = {"bias": FUSED_RNG.standard_normal(8), "skip": FUSED_RNG.standard_normal(TOKENS),
         "gamma": FUSED_RNG.uniform(0.5, 2, 8), "beta": FUSED_RNG.standard_normal(8)}


def fused(op, inputs, **attrs):
    return [node(op, inputs, domain="com.microsoft", **attrs)]


def skip_normed(x, z, r):
    """SkipLayerNormalization: LXT's LayerNorm rule at s = x + bias + skip, which passes R to x."""
    return ref.layer_norm_rule(x + FUSED["bias"] + FUSED["skip"], z, r, FUSED["gamma"], 1e-6, eps=1e-12)


CASES += [
    Case("Gelu-com.microsoft", SHAPE, fused("Gelu", ["x"]), passed),
    Case("BiasGelu", TOKENS, fused("BiasGelu", ["x", "bias"]), passed, FUSED),
    Case("FastGelu", TOKENS, fused("FastGelu", ["x", "bias"]), passed, FUSED),
    Case("QuickGelu", SHAPE, fused("QuickGelu", ["x"], alpha=1.5), passed),
    Case("SkipLayerNormalization", TOKENS, fused("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"]),
         skip_normed, FUSED, conserves=False),
    Case("SkipSimplifiedLayerNormalization", TOKENS,
         fused("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"]), passed, FUSED),
    Case("SimplifiedLayerNormalization", TOKENS,
         [node("SimplifiedLayerNormalization", ["x", "gamma"], axis=-1)], passed, FUSED),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_numpy(case, rng):
    x = rng.standard_normal((2,) + case.x_shape).astype(np.float32)
    model_z = _forward_z(case, x)
    seed = rng.uniform(-1, 1, (2, model_z[0].size)).astype(np.float32)
    _, relevance = run_explainer(case.nodes, x, case.weights, seed, opset=case.opset, composite="alpha-beta")
    for n in range(2):
        expected = case.reference(x[n].astype(np.float64), model_z[n].astype(np.float64),
                                  seed[n].reshape(model_z[n].shape).astype(np.float64))
        np.testing.assert_allclose(relevance[n], expected, rtol=case.rtol, atol=1e-5)
        if case.conserves:
            np.testing.assert_allclose(relevance[n].sum(), seed[n].sum(), rtol=1e-4, atol=1e-5)


def _forward_z(case, x):
    """The op's output z, computed by ORT on the original graph."""
    graph = helper.make_graph(case.nodes, "z", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              _initializers(case.weights))
    model = helper.make_model(graph, opset_imports=OPSETS(case.opset))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("op,attrs,x_shape,w_shape", [
    ("Conv", {"strides": [2, 2], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2}, (1, 4, 9, 10), (6, 2, 3, 3)),
    ("Conv", {"strides": [3], "pads": [0, 2]}, (1, 2, 13), (3, 2, 4)),
    ("Conv", {"pads": [1, 2, 0, 1], "dilations": [2, 1], "group": 2}, (1, 4, 7, 6), (6, 2, 3, 3)),
    ("Conv", {"pads": [3, 0], "dilations": [1]}, (1, 2, 9), (3, 2, 2)),
    ("Conv", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (1, 2, 8, 7), (3, 2, 2, 3)),
    # strided and undilated: a Conv per phase, interleaved (phases without a kernel row stay 0)
    ("Conv", {"strides": [2, 2]}, (2, 4, 9, 8), (5, 4, 1, 1)),
    ("Conv", {"strides": [2, 2], "pads": [3, 3, 3, 3]}, (1, 3, 11, 12), (4, 3, 7, 7)),
    ("Conv", {"strides": [2, 3], "pads": [1, 0, 0, 2], "group": 2}, (1, 4, 10, 11), (6, 2, 3, 4)),
    ("Conv", {"strides": [3, 3], "pads": [0, 0, 2, 2]}, (1, 2, 7, 7), (3, 2, 2, 2)),
    ("Conv", {"strides": [2, 2], "pads": [0, 0, 3, 3]}, (1, 2, 5, 5), (3, 2, 1, 1)),  # g's last row in the padding
    ("ConvTranspose", {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0], "group": 2},
     (1, 4, 4, 5), (4, 1, 3, 3)),
    ("Gemm", {"transB": 1}, (3, 6), (5, 6)),
    ("Gemm", {"transA": 1, "transB": 1}, (6, 3), (5, 6)),
])
def test_linear_map_adjoint(op, attrs, x_shape, w_shape, rng):
    """⟨F(x), g⟩ = ⟨x, Fᵀ(g)⟩ for the transposes the converter emits (catches pad/stride/shape slips)."""
    from lrp_onnx.builder import Builder
    from lrp_onnx.graph import find_units
    from lrp_onnx.load import import_graph, load_model
    from lrp_onnx.ops.linear import linear_map
    import onnx_graphsurgeon as gs
    w = rng.standard_normal(w_shape).astype(np.float32)
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["z"], name="layer", **attrs)], "adj",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None] * len(x_shape))],
                              [numpy_helper.from_array(w, "w")])
    proto, _ = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    g = import_graph(proto)
    (unit,) = find_units(g, g.inputs[0], g.outputs)
    b = Builder(g)
    z = g.outputs[0]
    cotangent = gs.Variable("g", dtype=np.float32, shape=z.shape)
    out = gs.Variable("xt", dtype=np.float32)
    transposed = linear_map(b, unit).transpose(b, cotangent, unit.inputs[1])
    g.nodes.append(gs.Node("Identity", inputs=[transposed], outputs=[out]))
    g.inputs.append(cotangent)
    g.outputs = [z, out]
    session = ort.InferenceSession(gs.export_onnx(g.cleanup().toposort()).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = rng.standard_normal(x_shape).astype(np.float32)
    gv = rng.standard_normal(z.shape).astype(np.float32)
    zv, xt = session.run(None, {"x": x, "g": gv})
    assert xt.shape == x.shape
    # float32 rounding scales with the terms, not with the (possibly cancelling) inner product
    np.testing.assert_allclose(np.vdot(zv, gv), np.vdot(x, xt), rtol=1e-4,
                               atol=1e-6 * np.linalg.norm(zv) * np.linalg.norm(gv))


def test_stabilizer_sign_of_zero_is_plus_one():
    """z = 1·1 + 1·(−1) = 0 exactly: ε-rule gives R_i = x_i w_i R / (0 + ε), not a division by Sign(0)=0."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"], name="layer")]
    x = np.array([[1.0, 1.0]], np.float32)
    seed = np.array([[1e-6]], np.float32)
    _, relevance = run_explainer(nodes, x, {"w": np.array([[1.0], [-1.0]])}, seed, composite="epsilon")
    np.testing.assert_allclose(relevance, [[1.0, -1.0]], rtol=1e-5)


def test_max_pool_backward_needs_no_indices_and_no_scatter():
    """TensorRT's parser takes neither MaxPool's Indices output nor a scatter-add (opset 16): an
    opset-13 MaxPool model keeps opset 13, and its explainer uses neither."""
    graph = helper.make_graph([node("MaxPool", ["x"], kernel_shape=[2, 2]), node("Flatten", ["z"], ["y"])], "o",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 18])])
    explainer = lrp_onnx.convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert explainer.opset_import[0].version == 13
    assert [len(n.output) for n in explainer.graph.node if n.op_type == "MaxPool"] == [1]
    assert not [n.op_type for n in explainer.graph.node if n.op_type.startswith("Scatter")]
    onnx.checker.check_model(explainer, full_check=True)


def test_shapes_computed_by_a_constant_sub_graph_are_known_after_folding(rng):
    """torch's ZeroPad2d computes its pads by Transpose of a constant, which shape inference cannot
    see through; the strided Conv after it needs its spatial sizes, known once constants are folded."""
    pads = np.array([[0, 0, 0, 0], [0, 0, 1, 1]], np.int64).T  # Transpose, then Reshape: [0, 0, 0, 0, 0, 0, 1, 1]
    nodes = [helper.make_node("Constant", [], ["p2"], name="pads", value=numpy_helper.from_array(pads)),
             helper.make_node("Transpose", ["p2"], ["pt"], name="transpose", perm=[1, 0]),
             helper.make_node("Reshape", ["pt", "flat"], ["p"], name="reshape"),
             helper.make_node("Pad", ["x", "p"], ["xp"], name="pad"),
             helper.make_node("Conv", ["xp", "w"], ["z"], name="layer", strides=[2, 2])]
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    seed = rng.standard_normal((2, 3 * 3 * 3)).astype(np.float32)
    weights = {"flat": np.array([-1], np.int64), "w": rng.standard_normal((3, 2, 3, 3))}
    _, relevance = run_explainer(nodes, x, weights, seed, composite="epsilon", epsilon=1e-9, stabilizer=1e-9)
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(1), seed.sum(1), rtol=1e-4)


# Window ops whose transpose needs the input's size: explained with that size known only at run time
DYNAMIC = ["conv2d", "conv-strided-dilated-grouped", "conv1d", "conv-transpose", "MaxPool-overlapping",
           "MaxPool-ties", "MaxPool-ceil-mode", "MaxPool-dilated", "MaxPool-gaps", "AveragePool",
           "AveragePool-pads-exclude", "AveragePool-pads-include", "GlobalAveragePool", "InstanceNormalization",
           "GroupNormalization"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in DYNAMIC] +
                         [c for c, rule, p in LINEAR_CASES if c.id in DYNAMIC and rule == "alpha-beta" and not p],
                         ids=lambda c: c.id)
def test_window_ops_take_their_sizes_from_the_run(case, rng):
    """Strided and padded windows and their transposes (the rows a window never reads, MaxPool's
    winners, the count of a normalisation) on sizes the file leaves dynamic: the same relevance as
    the numpy reference, as with the sizes in the file."""
    x = rng.standard_normal((2,) + case.x_shape).astype(np.float32)
    if isinstance(case, Linear):
        zero = np.zeros(case.x_shape)
        m = ref.dense_matrix(lambda s: case.affine(s) - case.affine(zero), case.x_shape)
        seed = rng.standard_normal((2, m.shape[0])).astype(np.float32)
        rules = {case.op: lrp_onnx.make_rule("alpha-beta")}
        _, relevance = run_explainer(case.nodes, x, case.weights, seed, rules=rules, dynamic=True)
        expected = [ref.lrp("alpha-beta", {}, m, x[n].reshape(-1).astype(np.float64), case.affine(zero).reshape(-1),
                            seed[n].astype(np.float64)) for n in range(2)]
    else:
        z = _forward_z(case, x)
        seed = rng.uniform(-1, 1, (2, z[0].size)).astype(np.float32)
        _, relevance = run_explainer(case.nodes, x, case.weights, seed, opset=case.opset, composite="alpha-beta",
                                     dynamic=True)
        expected = [case.reference(x[n].astype(np.float64), z[n].astype(np.float64),
                                   seed[n].reshape(z[n].shape).astype(np.float64)) for n in range(2)]
    for n in range(2):
        np.testing.assert_allclose(relevance[n].reshape(np.shape(expected[n])), expected[n], rtol=2e-4,
                                   atol=2e-4 * np.abs(expected[n]).max())

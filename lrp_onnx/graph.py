"""Group the forward graph into *units*, the things rules are assigned to.

A unit is one node, or a linear node together with the per-channel affine nodes that follow it
(bias Add/Sub, scale Mul/Div, an unmerged BatchNormalization). Grouping is exactly Zennit's
canonisation ("merge BatchNorm into the linear layer"), done without rewriting the forward graph:
the explainer's original outputs come from the original nodes, bit for bit, and the merged
weights are derived in the graph from the original initializers.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .quantized import QuantizedWeight, at_type_minimum, qlinear_form

LINEAR_HEADS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Integer products of dynamic quantization (ONNX Runtime's quantize_dynamic): an int32 result that
# a Cast to float and a Mul by the scales (the input's times the weight's) turn into the layer's
# float result, its first two followers (ops/quantized.py reads the whole as the float layer)
INTEGER_HEADS = ("ConvInteger", "MatMulInteger")
# Float layers with weights kept quantized in a packed form of their own (ONNX Runtime's weight-only
# quantization), read as MatMul by ops/quantized.py
PACKED_HEADS = ("MatMulNBits",)
AFFINE_FOLLOWERS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")


@dataclass
class Unit:
    head: gs.Node
    followers: list = field(default_factory=list)
    relevant: list = field(default_factory=list)  # per head input: does it depend on the explained input?
    role: Optional[str] = None  # set by the plan: "conv", "dense", "activation", ... (see registry.py)
    x_nonnegative: bool = False  # set by the plan: the first input is provably >= 0 (e.g. after a Relu)
    view: object = None  # registry.View of a unit read as another op (a quantized op as its float op)

    @property
    def name(self):
        return self.head.name

    @property
    def op(self):
        return self.head.op

    @property
    def inputs(self):
        return self.head.inputs

    @property
    def outputs(self):
        return (self.followers[-1] if self.followers else self.head).outputs


# Integer types that carry relevance: a quantized activation stands for (q − zero point)·scale, a
# raw pixel for itself (quantized.py). Wider integers are shapes, indices, token ids and masks.
SMALL_INTEGERS = ("int8", "uint8", "int16", "uint16")
# Outputs that are a quantizer's parameters, not values: DynamicQuantizeLinear's scale and zero point
PARAMETER_OUTPUTS = {"DynamicQuantizeLinear": (1, 2)}


def carries_relevance(t):
    """Float tensors (or of unknown type) and small-integer values carry relevance; shape
    sub-graphs, indices, masks and quantization parameters do not."""
    producer = t.inputs[0] if t.inputs else None
    if producer is not None and any(
        i < len(producer.outputs) and producer.outputs[i] is t for i in PARAMETER_OUTPUTS.get(producer.op, ())
    ):
        return False
    return t.dtype is None or _dtype_kind(t.dtype) == "f" or _dtype_name(t.dtype) in SMALL_INTEGERS


def _dtype_name(dtype):
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def _dtype_kind(dtype):
    try:
        return np.dtype(dtype).kind
    except TypeError:  # sequences and maps (ZipMap) come through with an undefined element type
        return None


def is_constant(t):
    """Whether ``t``'s values are fixed and at hand (``t.values``): a constant, or a weight the model
    keeps quantized (its DequantizeLinear stays in the forward)."""
    return isinstance(t, (gs.Constant, QuantizedWeight))


def channel_count(node):
    """Number of output channels of a linear head, read from its weight."""
    if node.op == "MatMulNBits":
        return node.attrs["N"]
    w = node.inputs[1].values
    if node.op in ("Conv", "ConvInteger"):
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * node.attrs.get("group", 1)
    if node.op == "Gemm":
        return w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
    return w.shape[-1]


def per_channel(value, node):
    """``value`` as a length-C vector if it broadcasts over the head's output channels only, else None."""
    if not is_constant(value):
        return None
    v = np.asarray(value.values, np.float64)
    c = channel_count(node)
    axis = 1 if node.op in ("Conv", "ConvTranspose", "ConvInteger") else -1
    out_rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    if v.ndim == 0 or v.size == 1:
        return np.full(c, v.reshape(-1)[0])
    if out_rank is None or v.ndim > out_rank:
        return None
    shape = [1] * (out_rank - v.ndim) + list(v.shape)
    others = [d for i, d in enumerate(shape) if i != (axis % out_rank)]
    if any(d != 1 for d in others) or shape[axis] not in (1, c):
        return None
    return np.broadcast_to(v.reshape(-1), (c,)).copy()


def batch_norm_affine(node):
    """BatchNormalization (inference) as y = s·x + t per channel: s = γ/√(σ²+ε), t = β − μ·s."""
    gamma, beta, mean, var = (np.asarray(t.values, np.float64).reshape(-1) for t in node.inputs[1:5])
    s = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    return s, beta - mean * s


def casts_to_float(node):
    return node.op == "Cast" and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])).kind == "f"


def _is_linear_head(node):
    return (
        node.op in LINEAR_HEADS + INTEGER_HEADS + PACKED_HEADS and len(node.inputs) >= 2 and is_constant(node.inputs[1])
    )


def _absorbable(follower, head, y, position):
    """Can ``follower``, the head's ``position``-th, be folded into the head's weights as
    y ↦ s·y + t, s and t per channel (or, for an integer head, be its Cast and scale Mul)?"""
    if head.op in INTEGER_HEADS and position < 2:
        if position == 0:
            return casts_to_float(follower)
        return follower.op == "Mul" and len(follower.inputs) == 2
    if follower.op == "BatchNormalization":
        return (
            follower.inputs[0] is y
            and all(is_constant(t) for t in follower.inputs[1:5])
            and not follower.attrs.get("training_mode", 0)
        )
    if follower.op not in AFFINE_FOLLOWERS or len(follower.inputs) != 2:
        return False  # PRelu, a 1×1 Conv, a Split with constant sizes: two inputs, but not y ↦ s·y + t
    other = follower.inputs[1] if follower.inputs[0] is y else follower.inputs[0]
    if follower.op in ("Sub", "Div") and follower.inputs[0] is not y:
        return False  # c - y and c / y are not of the form s·y + t we fold
    return per_channel(other, head) is not None


def find_units(graph, explained, outputs):
    """Units of the nodes that depend on ``explained``, in topological order.

    A follower is absorbed only if its input feeds nothing else and is not a graph output, so
    folding it never hides a tensor some other unit needs. Integer outputs (Shape, ArgMax, ...)
    depend on the input but carry no relevance: a node that makes only those is no unit, so
    shape arithmetic such as Shape → Gather → Concat → Reshape stays out of the reverse walk.
    """
    graph_outputs = {t.name for t in outputs}
    relevant = {explained.name}
    units, absorbed = [], set()
    for node in graph.nodes:
        if id(node) in absorbed or not any(t.name in relevant for t in node.inputs):
            continue
        unit = Unit(node, relevant=[t.name in relevant for t in node.inputs])
        if _is_linear_head(node) and unit.relevant[0] and not any(unit.relevant[1:]):
            y = node.outputs[0]
            while (
                len(y.outputs) == 1
                and y.name not in graph_outputs
                and _absorbable(y.outputs[0], node, y, len(unit.followers))
            ):
                follower = y.outputs[0]
                if any(t.name in relevant for t in follower.inputs if t is not y):
                    break
                unit.followers.append(follower)
                y = follower.outputs[0]
        if not any(carries_relevance(t) for t in unit.outputs):
            continue
        absorbed.update(id(f) for f in unit.followers)
        relevant.update(t.name for t in unit.outputs if carries_relevance(t))
        units.append(unit)
    return units


# Non-negativity, propagated forward so that rules can drop terms of x⁻ = min(x, 0) that are zero.
# For an integer tensor it is its value's: (q − zero point)·scale for a quantized one.
MAKE_NONNEGATIVE = ("Relu", "Sigmoid", "Softplus", "HardSigmoid", "Softmax", "Abs", "Exp")
KEEP_FIRST_INPUT_SIGN = (
    "MaxPool",
    "GlobalMaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Identity",
    "Dropout",
    "Slice",
    "Gather",
    "Split",
    "LRN",
    "Cast",
    "Expand",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
)
KEEP_ALL_INPUTS_SIGN = ("Concat", "Add", "Sum", "Mul", "Min")


def nonnegative_tensors(graph):
    """Names of the tensors that are >= 0 for every input: activations like Relu, non-negative
    constants, unsigned raw inputs (pixels), what pooling, routing, sums and products make of them,
    and quantized values whose zero point is their type's minimum (nothing below 0 representable,
    where a quantizer folded a Relu into the range)."""
    known = {
        t.name
        for t in graph.tensors().values()
        if is_constant(t) and _dtype_kind(t.dtype) in "fiub" and t.values.size and t.values.min() >= 0
    }
    known.update(t.name for t in graph.inputs if _dtype_kind(t.dtype) == "u")

    def nonneg(t):
        return bool(t.name) and t.name in known

    for node in graph.nodes:
        if all(is_constant(t) for t in node.outputs):
            continue  # known from its values
        form = qlinear_form(node)
        if form is not None:
            operands = [node.inputs[value] for value, _, _ in form.operand_triples(node)]
            ok = at_type_minimum(form.output_zero_point(node)) or _stays_nonnegative(form.float_op, operands, nonneg)
        else:
            ok = (
                node.op == "QuantizeLinear" and len(node.inputs) > 2 and at_type_minimum(node.inputs[2])
            ) or _stays_nonnegative(node.op, node.inputs, nonneg)
        if ok:
            known.update(t.name for t in node.outputs if carries_relevance(t))
    return known


def _stays_nonnegative(op, inputs, nonneg):
    """Whether op's output is >= 0 given which of its (positional) inputs are."""
    if op in MAKE_NONNEGATIVE:
        return True
    if op in KEEP_FIRST_INPUT_SIGN:
        return nonneg(inputs[0])
    data = [t for t in inputs if t.name]
    if op in KEEP_ALL_INPUTS_SIGN:
        return all(nonneg(t) for t in data)
    if op == "Max":
        return any(nonneg(t) for t in data)
    if op == "Clip":
        return nonneg(inputs[0]) or (len(inputs) > 1 and nonneg(inputs[1]))
    if op == "Pad":
        return nonneg(inputs[0]) and (len(inputs) < 3 or not inputs[2].name or nonneg(inputs[2]))
    return False

"""Quantized ops read as their float ops (quantized.py): the float op's propagator sees the
dequantized operands, constant ones (weights) as constants, and as the layer's output its float
result before requantization.

- QOperator ops (QLinearConv, QGemm, QLinearAdd, ...): ``float_view``.
- Dynamic quantization's integer products (ConvInteger, MatMulInteger, with the Cast and scale
  Mul that find_units gives them as followers): ``integer_view``.
- Weight-only quantization (MatMulNBits): ``nbits_view``.
"""

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Unit, is_constant
from ..quantized import QLINEAR_FORMS, StandIn, dequantize, nbits_weight, qlinear_form
from ..registry import View, viewed

# Attributes of a QOperator op that its float op does not take
QUANTIZED_ONLY_ATTRIBUTES = ("channels_last", "opset")


def float_view(unit):
    """The View of a QOperator unit as its float op: a Unit over stand-ins for the dequantized
    operands (DequantizeLinear of the operand, emitted when bound) or constants (fixed operands),
    whose output stands for the float result (the float op, emitted when bound and read)."""
    node = unit.head
    form = qlinear_form(node)
    if node.attrs.get("channels_last", 0):
        return "channels_last=1 (NHWC) is not supported"
    if form.float_op == "Softmax" and node.attrs.get("opset", 13) < 13 and node.attrs.get("axis", 1) != -1:
        return "QLinearSoftmax of opset < 13 flattens to 2-D from its axis; only axis -1 is supported"
    inputs, sources, dequantizers = [], [], []
    for k, triple in enumerate(form.operand_triples(node)):
        q, parameters = node.inputs[triple[0]], [_present(node, i) for i in triple[1:]]
        axis = form.operand_axis(node, k)
        if is_constant(q) and all(p is None or is_constant(p) for p in parameters):
            values = dequantize(q.values, *[p if p is None else p.values for p in parameters], axis=axis)
            inputs.append(gs.Constant(f"lrp/{unit.name}/dequantized_{k}", values))
            sources.append(None)
            continue
        stand_in = StandIn(f"lrp/{unit.name}/dequantized_{k}", q)
        dequantizers.append(([q, *parameters], axis, stand_in))
        inputs.append(stand_in)
        sources.append(triple[0])
    attrs = {k: v for k, v in node.attrs.items() if k not in QUANTIZED_ONLY_ATTRIBUTES}
    if form.bias is not None and _present(node, form.bias) is not None:
        bias = _bias(node, form, unit)
        if isinstance(bias, str):
            return bias
        inputs.append(bias)
        sources.append(None)
        if form.float_op == "Gemm":  # QGemm computes alpha·(A·B + C), so C enters as Gemm's β·C with β = α
            attrs["beta"] = attrs.get("alpha", 1.0)
    output = gs.Variable(f"lrp/{unit.name}/float_output", np.float32, unit.outputs[0].shape)
    head = gs.Node(form.float_op, f"lrp/{unit.name}/{form.float_op}", attrs, inputs, [output])
    view_unit = Unit(head, relevant=[source is not None and unit.relevant[source] for source in sources])
    return View(view_unit, sources, lambda b: _bind(b, head, dequantizers))


def _dequantize_into(b, inputs, stand_in, axis=1):
    """A DequantizeLinear of ``inputs`` (value, scale, zero point or None) whose output is ``stand_in``."""
    present = inputs if inputs[-1] is not None else inputs[:-1]  # the zero point is optional
    b.graph.nodes.append(gs.Node("DequantizeLinear", b.name("dequantize"), {"axis": axis}, present, [stand_in]))


def _present(node, index):
    """Input ``index`` of ``node``, None where it is absent (an optional zero point)."""
    return node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else None


def _bias(node, form, unit):
    """The int32 bias as a float constant: its scale is the product of the first two operands'."""
    scales = [node.inputs[triple[1]] for triple in form.operands[:2]]
    bias = node.inputs[form.bias]
    if not all(is_constant(t) for t in scales + [bias]):
        return f"the bias of {unit.op} and its operands' scales must be constants"
    scale = np.asarray(scales[0].values, np.float32) * np.asarray(scales[1].values, np.float32)
    return gs.Constant(f"lrp/{unit.name}/dequantized_bias", dequantize(bias.values, scale.reshape(-1), axis=-1))


def _bind(b, head, dequantizers):
    """Emit what the stand-ins of a float view stand for: a DequantizeLinear per computed operand,
    and the float op itself, which graph cleanup removes where no rule reads its output."""
    for inputs, axis, stand_in in dequantizers:
        _dequantize_into(b, inputs, stand_in, axis)
    b.graph.nodes.append(head)


viewed(*QLINEAR_FORMS, view=float_view)


def integer_view(unit):
    """The View of ConvInteger or MatMulInteger(x_q, w_q, x_zero, w_zero) → Cast → Mul(·, x_scale·w_scale)
    [→ a bias Add, ...] as the float layer Conv or MatMul(DequantizeLinear(x_q), (w_q − w_zero)·w_scale)
    with the same further followers, whose output is the model's float result."""
    head = unit.head
    if len(unit.followers) < 2:
        return f"{unit.op} needs the Cast to float and the Mul by its scales that dynamic quantization writes"
    cast, scaling = unit.followers[:2]
    x_q, w_q = head.inputs[:2]
    x_zero, w_zero = (_present(head, i) for i in (2, 3))
    x_scale = _scale_of(x_q)
    scales = next(t for t in scaling.inputs if t is not cast.outputs[0])
    producer = scales.inputs[0] if scales.inputs else None
    w_scale = None
    if (
        producer is not None
        and producer.op == "Mul"
        and x_scale is not None
        and any(t is x_scale for t in producer.inputs)
    ):
        w_scale = next((t for t in producer.inputs if t is not x_scale), None)
    if w_scale is None or not is_constant(w_scale) or (w_zero is not None and not is_constant(w_zero)):
        return f"{unit.op}'s scales are not its input's scale times a constant weight scale"
    float_op = "Conv" if unit.op == "ConvInteger" else "MatMul"
    axis = 0 if float_op == "Conv" else -1
    zero = None if w_zero is None else np.asarray(w_zero.values).reshape(-1)
    weight = dequantize(w_q.values, np.asarray(w_scale.values, np.float32).reshape(-1), zero, axis=axis)
    stand_in = StandIn(f"lrp/{unit.name}/dequantized_0", x_q)
    float_head = gs.Node(
        float_op,
        f"lrp/{unit.name}/{float_op}",
        dict(head.attrs),
        [stand_in, gs.Constant(f"lrp/{unit.name}/dequantized_1", weight)],
        [gs.Variable(f"lrp/{unit.name}/float_output", np.float32, scaling.outputs[0].shape)],
    )
    followers = unit.followers[2:]  # a bias Add, a BatchNorm: folded as for any linear layer
    view_unit = Unit(float_head, followers, relevant=[unit.relevant[0], False])

    def bind(b):
        _dequantize_into(b, [x_q, x_scale, x_zero], stand_in)
        if not followers:  # the layer's output is the float layer's, computed again (cleanup drops it if unread)
            b.graph.nodes.append(float_head)

    return View(view_unit, [0, None] + [None] * (len(head.inputs) - 2), bind)


def _scale_of(q):
    """The scale tensor a quantized activation was made with: DynamicQuantizeLinear's second output,
    or QuantizeLinear's scale input; None for anything else."""
    producer = q.inputs[0] if q.inputs else None
    if producer is not None and producer.op == "DynamicQuantizeLinear":
        return producer.outputs[1]
    if producer is not None and producer.op == "QuantizeLinear":
        return producer.inputs[1]
    return None


viewed(("", "ConvInteger"), ("", "MatMulInteger"), view=integer_view)


def nbits_view(unit):
    """The View of MatMulNBits(A, packed B, scales, zero points[, g_idx, bias]) as MatMul(A, W) with
    W its dequantized weight [K, N], and a bias Add where it has one, before its own followers."""
    head = unit.head
    if _present(head, 4) is not None:
        return "MatMulNBits with g_idx (deprecated) is not supported"
    if not all(is_constant(t) for t in head.inputs[1:] if t.name):
        return "MatMulNBits' weights, scales and zero points must be constants"
    a = head.inputs[0]
    stand_in = StandIn(f"lrp/{unit.name}/input", a)
    product = gs.Variable(f"lrp/{unit.name}/float_output", np.float32, head.outputs[0].shape)
    matmul = gs.Node(
        "MatMul",
        f"lrp/{unit.name}/MatMul",
        {},
        [stand_in, gs.Constant(f"lrp/{unit.name}/dequantized_1", nbits_weight(head))],
        [product],
    )
    followers = list(unit.followers)
    bias = _present(head, 5)
    if bias is not None:  # its own bias as a follower Add, folded as any
        biased = gs.Variable(f"lrp/{unit.name}/biased", np.float32, head.outputs[0].shape)
        copy = gs.Constant(f"lrp/{unit.name}/bias", bias.values)  # view nodes read no graph tensor
        followers.insert(0, gs.Node("Add", f"lrp/{unit.name}/bias", {}, [product, copy], [biased]))
    view_unit = Unit(matmul, followers, relevant=[unit.relevant[0], False])
    virtual = [matmul] + followers[: 1 if bias is not None else 0]

    def bind(b):
        b.graph.nodes.append(gs.Node("Identity", b.name("input"), {}, [a], [stand_in]))
        if not unit.followers:  # the view's output is computed again (cleanup drops what no rule reads)
            b.graph.nodes.extend(virtual)

    return View(view_unit, [0] + [None] * (len(head.inputs) - 1), bind)


viewed(("com.microsoft", "MatMulNBits"), view=nbits_view)

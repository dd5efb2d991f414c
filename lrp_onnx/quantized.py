"""Quantized graphs, read as the float networks they stand for.

An 8- or 16-bit integer activation q stands for the real value (q − zero_point)·scale; relevance
at it is the relevance of that value (graph.carries_relevance). The explainer's forward keeps
the model's own quantized ops, so its outputs are the quantized model's; rules see float values:

- QDQ (DequantizeLinear → op → QuantizeLinear): the op is a float op already. A weight the model
  keeps quantized, DequantizeLinear(constant), stays in the forward and becomes a
  ``QuantizedWeight``: a graph tensor whose dequantized values the rules read as a constant's.
  A QuantizeLinear → DequantizeLinear pair on an activation is a rounding: relevance passes it
  one to one (ops/routing.py), as Zennit's Pass rule would.
- QOperator (QLinearConv, QGemm, QLinearAdd, ...): each is read as its float op on dequantized
  operands (``QLINEAR_FORMS``, and ops/quantized.py, which hands such a view to the float op's
  propagator), with its float result before requantization as the layer's output.

A runtime runs a QDQ group DequantizeLinear → op → QuantizeLinear as one integer kernel only while
nothing else reads its tensors: ONNX Runtime's x86 build, for one, leaves a layer in float once a
second reader appears on its int8 input; it fuses a DynamicQuantizeLinear and its MatMulInteger
into DynamicQuantizeMatMul likewise, which rounds otherwise. So that the explainer's outputs stay
the model's bit for bit, the relevance pass reads none of them: ``mirror_qdq_forward`` adds a
mirror of the forward (the same ops, scalar quantization parameters under new names so that no
runtime merges it with the original), which the runtime computes op by op as the graph defines
it, and which the rules read instead. The cost is one more forward pass.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

QUANTIZERS = ("QuantizeLinear", "DequantizeLinear")
MICROSOFT = "com.microsoft"


class QuantizedWeight(gs.Variable):
    """The output of QuantizeLinear/DequantizeLinear nodes on constants: a weight the model keeps
    quantized. It stays a Variable, so the forward still runs those nodes (a runtime then runs
    the layer in integers, as the model does), and ``values`` holds what they compute."""

    def __init__(self, variable, values):
        super().__init__(variable.name, dtype=variable.dtype, shape=variable.shape)
        self.values = values


class StandIn(gs.Variable):
    """An operand of a quantized op's float view (ops/quantized.py): the float value of the graph
    tensor ``source`` (its dequantization, emitted when the view is bound). Searches through the
    graph, as for a gate's signal, start from ``source``."""

    def __init__(self, name, source):
        super().__init__(name, dtype=np.float32, shape=source.shape)
        self.source = source


def origin(t):
    """The graph tensor that ``t`` stands for: its source where ``t`` is a StandIn, else ``t``."""
    return t.source if isinstance(t, StandIn) else t


def dequantize(q, scale, zero_point=None, axis=1, block_size=0):
    """DequantizeLinear in numpy, as ONNX defines it and ONNX Runtime rounds it: the integer
    difference (q − zero_point) in int32, converted to float32 and times the float32 scale."""
    scale, zero_point = _broadcast(q, scale, axis, block_size), _broadcast(q, zero_point, axis, block_size)
    difference = q.astype(np.int32) - (0 if zero_point is None else zero_point.astype(np.int32))
    return np.asarray(difference.astype(np.float32) * scale.astype(np.float32))  # an array even for a scalar


def quantize(x, scale, zero_point, axis=1, block_size=0, saturate=1):
    """QuantizeLinear in numpy: round half to even of x / scale (float32), plus the zero point,
    saturated to the zero point's integer type."""
    dtype = np.dtype(zero_point.dtype) if zero_point is not None else np.dtype(np.uint8)
    scale, zero_point = _broadcast(x, scale, axis, block_size), _broadcast(x, zero_point, axis, block_size)
    shifted = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + (
        0 if zero_point is None else zero_point.astype(np.float64)
    )
    if dtype.kind not in "iu":
        raise ValueError(f"QuantizeLinear to {dtype} is not supported")
    return np.asarray(np.clip(shifted, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype))


def _broadcast(x, parameter, axis, block_size):
    """A per-tensor, per-axis or blocked scale or zero point, shaped to broadcast against x."""
    if parameter is None or parameter.ndim == 0 or x.ndim == 0:
        return parameter if parameter is None else parameter.reshape(())
    axis = axis % x.ndim
    if block_size:  # opset 21 blocked quantization: one value per block of ``block_size`` along axis
        return np.repeat(parameter, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
    if parameter.ndim == 1:
        return parameter.reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return parameter


def unpack_bits(packed, bits):
    """uint8 bytes holding ``bits``-bit unsigned values, the first in the lowest bits (MatMulNBits'
    packing), unpacked along the last axis."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def nbits_weight(node):
    """MatMulNBits' weight as the float [K, N] matrix it stands for: per row n and block j of
    ``block_size`` along K, W[k, n] = (q[n, k] − zero_point[n, j])·scale[n, j], the zero point
    2^(bits−1) where none is given (ONNX Runtime's contrib operator)."""
    k, n, bits, block = (node.attrs[a] for a in ("K", "N", "bits", "block_size"))
    blocks = -(-k // block)
    q = unpack_bits(np.asarray(node.inputs[1].values, np.uint8).reshape(n, -1), bits)[:, :k].astype(np.float32)
    scales = np.asarray(node.inputs[2].values, np.float32).reshape(n, blocks)
    zero = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if zero is None:
        zeros = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif np.asarray(zero.values).dtype == np.uint8:
        zeros = unpack_bits(np.asarray(zero.values).reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    else:
        zeros = np.asarray(zero.values, np.float32).reshape(n, blocks)
    per_k = lambda t: np.repeat(t, block, axis=1)[:, :k]
    return ((q - per_k(zeros)) * per_k(scales)).T


def evaluate(node, values):
    """A QuantizeLinear or DequantizeLinear of fixed ``values`` (its inputs', None where absent)."""
    axis, block_size = node.attrs.get("axis", 1), node.attrs.get("block_size", 0)
    if node.op == "DequantizeLinear":
        return dequantize(*values[:3] + [None] * (3 - len(values)), axis=axis, block_size=block_size)
    return quantize(values[0], values[1], values[2] if len(values) > 2 else None, axis, block_size)


def read_quantized_weights(graph):
    """QuantizeLinear/DequantizeLinear nodes on constants, kept in the forward (``fold_constants``
    leaves them), get ``QuantizedWeight`` outputs that carry the values they compute."""
    for node in graph.nodes:  # topological: a Q → DQ chain on a float constant is read in turn
        if node.op not in QUANTIZERS or (node.domain or "") not in ("", "ai.onnx", MICROSOFT):
            continue
        fixed = [t for t in node.inputs if t.name]
        if not fixed or not all(isinstance(t, (gs.Constant, QuantizedWeight)) for t in fixed):
            continue
        output = node.outputs[0]
        weight = QuantizedWeight(output, evaluate(node, [t.values if t.name else None for t in node.inputs]))
        for reader in list(output.outputs):
            for i, t in enumerate(reader.inputs):
                if t is output:
                    reader.inputs[i] = weight
        graph.outputs = [weight if t is output else t for t in graph.outputs]
        node.outputs[0] = weight


@dataclass(frozen=True)
class QLinearForm:
    """How a QOperator op stands for a float op. Indices are the op's inputs: ``operands`` one
    (value, scale, zero point) triple per float input (zero point None where absent), ``output``
    the (scale, zero point) its result is requantized with (None for a float result), ``bias`` an
    int32 input whose scale is the first two operands' scales multiplied."""

    float_op: str
    operands: tuple
    output: Optional[tuple] = None
    bias: Optional[int] = None
    first_operand: int = 0  # QLinearConcat: its operand triples start after the output's parameters
    # per operand, the axis a 1-D (per-channel) scale runs along; "transB": Gemm's B, by its layout
    axes: tuple = ()

    def operand_axis(self, node, k):
        axis = self.axes[k] if k < len(self.axes) else 1
        return (0 if node.attrs.get("transB", 0) else 1) if axis == "transB" else axis

    def operand_triples(self, node):
        if self.first_operand:
            rest = len(node.inputs) - self.first_operand
            return tuple(
                (self.first_operand + 3 * k, self.first_operand + 3 * k + 1, self.first_operand + 3 * k + 2)
                for k in range(rest // 3)
            )
        return self.operands

    def output_zero_point(self, node):
        """The output's zero point tensor, None for a float output or one not given (0)."""
        if self.output is None or len(node.inputs) <= self.output[1] or not node.inputs[self.output[1]].name:
            return None
        return node.inputs[self.output[1]]


UNARY = ((0, 1, 2),)
BINARY = ((0, 1, 2), (3, 4, 5))
# (domain, op) -> its float form; the contrib ops are ONNX Runtime's (com.microsoft). QLinearReduceMean
# and QLinearWhere are left out: ONNX Runtime has no CPU kernel for them to test against.
QLINEAR_FORMS = {
    ("", "QLinearConv"): QLinearForm("Conv", BINARY, (6, 7), bias=8, axes=(1, 0)),
    ("", "QLinearMatMul"): QLinearForm("MatMul", BINARY, (6, 7), axes=(-2, -1)),
    (MICROSOFT, "QGemm"): QLinearForm("Gemm", BINARY, (7, 8), bias=6, axes=(1, "transB")),
    (MICROSOFT, "QLinearAdd"): QLinearForm("Add", BINARY, (6, 7)),
    (MICROSOFT, "QLinearMul"): QLinearForm("Mul", BINARY, (6, 7)),
    (MICROSOFT, "QLinearConcat"): QLinearForm("Concat", (), (0, 1), first_operand=2),
    (MICROSOFT, "QLinearAveragePool"): QLinearForm("AveragePool", UNARY, (3, 4)),
    (MICROSOFT, "QLinearGlobalAveragePool"): QLinearForm("GlobalAveragePool", UNARY, (3, 4)),
    (MICROSOFT, "QLinearSigmoid"): QLinearForm("Sigmoid", UNARY, (3, 4)),
    (MICROSOFT, "QLinearLeakyRelu"): QLinearForm("LeakyRelu", UNARY, (3, 4)),
    (MICROSOFT, "QLinearSoftmax"): QLinearForm("Softmax", UNARY, (3, 4)),
}


def qlinear_form(node):
    """The QLinearForm of a QOperator node, else None."""
    domain = node.domain or ""
    return QLINEAR_FORMS.get(("" if domain == "ai.onnx" else domain, node.op))


def at_type_minimum(zero_point):
    """Whether a constant zero point is its integer type's smallest value everywhere (uint8 0,
    int8 −128): then no value below 0 is representable, as after a Relu that the quantizer folded
    into the quantization range."""
    if not isinstance(zero_point, (gs.Constant, QuantizedWeight)):
        return False
    values = np.asarray(zero_point.values)
    return values.dtype.kind in "iu" and values.size > 0 and bool((values == np.iinfo(values.dtype).min).all())


def shape_twin(proto):
    """A copy of ``proto`` with each QOperator node replaced by its float op between Casts, for
    ONNX's shape inference, which knows no com.microsoft op: the model's tensors keep their names,
    so the shapes inferred on the twin are the model's. None where there is no QOperator node."""
    graph = proto.graph
    if not any(qlinear_form(_NodeKey(n)) for n in graph.node):
        return None
    types = {t.name: t.data_type for t in graph.initializer}
    types.update((v.name, v.type.tensor_type.elem_type) for v in list(graph.input) + list(graph.value_info))
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    nodes = []
    for node in twin.graph.node:
        form = qlinear_form(_NodeKey(node))
        if form is None:
            nodes.append(node)
            continue
        values = [node.input[triple[0]] for triple in form.operand_triples(_NodeKey(node))]
        if form.bias is not None and len(node.input) > form.bias and node.input[form.bias]:
            values.append(node.input[form.bias])
        floats = [f"{node.output[0]}/twin_{k}" for k in range(len(values))]
        nodes += [onnx.helper.make_node("Cast", [v], [f], to=onnx.TensorProto.FLOAT) for v, f in zip(values, floats)]
        attrs = {
            a.name: onnx.helper.get_attribute_value(a)
            for a in node.attribute
            if a.name not in ("channels_last", "opset")
        }
        zero_point = node.input[form.output[1]] if len(node.input) > form.output[1] else ""
        if not zero_point and (len(node.input) <= form.output[0] or not node.input[form.output[0]]):
            nodes.append(onnx.helper.make_node(form.float_op, floats, [node.output[0]], **attrs))  # a float result
            continue
        result = f"{node.output[0]}/twin_float"
        nodes.append(onnx.helper.make_node(form.float_op, floats, [result], **attrs))
        nodes.append(
            onnx.helper.make_node("Cast", [result], [node.output[0]], to=types.get(zero_point, onnx.TensorProto.UINT8))
        )
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    return twin


class _NodeKey:
    """A NodeProto as ``qlinear_form`` and ``operand_triples`` read a node: op, domain, input count."""

    def __init__(self, node):
        self.op, self.domain, self.inputs = node.op_type, node.domain, list(node.input)
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


MIRROR = "/lrp_float"  # suffix of the mirror's tensors and of the original nodes it stands in for


def has_fusable_layers(graph):
    """Whether a runtime may run some of the graph's quantized layers as one kernel, which it does
    only while nothing else reads their tensors: a QDQ group (some op other than a QuantizeLinear
    reads a DequantizeLinear of an activation), or a DynamicQuantizeLinear and the MatMulInteger
    that reads it (ONNX Runtime's DynamicQuantizeMatMul, which rounds otherwise than the two)."""
    return any(
        node.op == "DynamicQuantizeLinear"
        or node.op == "DequantizeLinear"
        and not isinstance(node.inputs[0], (gs.Constant, QuantizedWeight))
        and any(reader.op != "QuantizeLinear" for reader in node.outputs[0].outputs)
        for node in graph.nodes
    )


def mirror_qdq_forward(graph):
    """In a QDQ or dynamically quantized graph, a mirror of every node that depends on a graph input
    (see the module docstring). The mirror nodes take the original node names, which rules and
    messages use, and the originals become ``name + MIRROR``; the mirror's tensors are
    ``name + MIRROR``. Weights are shared; scalar constants (the activations' scales and zero
    points) are copied. A float16 model has its float32 mirror already (precision.py), which a
    runtime cannot fuse: it computes in float."""
    if not has_fusable_layers(graph) or any(node.name.endswith(MIRROR) for node in graph.nodes):
        return
    mirrored = {t.name: t for t in graph.inputs}
    copies = {}

    def mirror(t):
        if t.name in mirrored:
            return mirrored[t.name]
        if isinstance(t, gs.Constant) and t.values.ndim == 0:
            copies.setdefault(t.name, gs.Constant(t.name + MIRROR, t.values.copy()))
            return copies[t.name]
        return t

    inputs = set(mirrored)
    for node in list(graph.nodes):
        if not any(t.name in mirrored for t in node.inputs):
            continue
        outputs = [
            gs.Variable(t.name + MIRROR, t.dtype, t.shape) if t.name else gs.Variable.empty() for t in node.outputs
        ]
        mirrored.update((t.name, m) for t, m in zip(node.outputs, outputs) if t.name)
        name, node.name = node.name, node.name + MIRROR
        copy = gs.Node(node.op, name, dict(node.attrs), [mirror(t) for t in node.inputs], outputs, domain=node.domain)
        graph.nodes.append(copy)
        if copy.inputs == node.inputs:  # a DynamicQuantizeLinear of a graph input, say
            _keep_apart(graph, node, inputs)


def _keep_apart(graph, node, inputs):
    """The original ``node``, whose mirror reads the very same tensors, reads its float graph
    inputs through Max(x, x) = x: a runtime's common-subexpression elimination would otherwise merge
    the two, and the relevance pass would read the original's outputs (ONNX Runtime then no longer
    fuses a DynamicQuantizeLinear with its MatMulInteger)."""
    for i, t in enumerate(node.inputs):
        if t.name in inputs and t.dtype is not None and np.dtype(t.dtype).kind == "f":
            same = gs.Variable(f"{node.name}/input{i}", t.dtype, t.shape)
            graph.nodes.append(gs.Node("Max", f"{node.name}/Max{i}", inputs=[t, t], outputs=[same]))
            node.inputs[i] = same


def mirrored(graph, tensor):
    """The mirror of ``tensor`` (mirror_qdq_forward) where the graph has one, else ``tensor``."""
    return graph.tensors().get(tensor.name + MIRROR, tensor)

"""Half-precision models (float16, bfloat16) are explained in float32.

The load step ``upcast_to_float32`` turns every float16 and bfloat16 weight, value type and type
attribute into float32; the converter then builds the explainer as for any float32 model, and
``restore_half_boundary`` gives the explainer the original's half-precision inputs and outputs back.

Why float32 and not a float16 relevance pass:
- LRP divides relevance by stabilised pre-activations: R/(z + ε·sign z). float16 spans 6e-8
  (smallest subnormal) to 65504: with Zennit's ε = 1e-6, a z at or near 0 makes the ratio up to
  R·1e6, inf for any R above 0.066. An ε that can never overflow (≥ max|R|/65504) depends on the
  relevance's scale and changes the rule's result, so a float16 pass cannot keep Zennit's
  semantics.
- Upcasting float16 (or bfloat16) to float32 is exact, so the explainer of a half-precision model
  is the float32 explainer of the very same weights.
- ONNX Runtime's CPU provider has few float16 kernels and inserts casts to float32 around the
  others anyway; it has no bfloat16 kernel for Conv, Gemm, MatMul, Add, Mul, Div, Sum, Relu,
  MaxPool or Softmax ("Could not find an implementation"), only for Cast, so a bfloat16 pass
  could not run there.
The cost: weights are stored in float32, so the explainer file is about twice the original's size.
"""

import json

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import UnsupportedModelError
from .external import graph_tensors, subgraphs

HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# Integer attributes of standard ops that name an element type: Cast's ``to``; the ``dtype`` of
# EyeLike, RandomNormal(Like), RandomUniform(Like), Bernoulli; DequantizeLinear's ``output_dtype``.
TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
STANDARD_DOMAINS = ("", "ai.onnx")
# metadata key of the upcast model: {graph input/output name: its original element type}
UPCAST_KEY = "lrp_onnx.upcast_from"
# The explainer's boundary. A float16 input is cast to float32 on entry and a float16 output back
# on exit. numpy has no bfloat16 and ONNX Runtime's Python API can neither take nor return it, so
# a bfloat16 input or output is float32 at the boundary, rounded to bfloat16 on the way in (the
# values the original model would see) and on the way out (the values it would return).
BOUNDARY_TYPE = {TensorProto.FLOAT16: TensorProto.FLOAT16, TensorProto.BFLOAT16: TensorProto.FLOAT}
CASTS_IN = {TensorProto.FLOAT16: [TensorProto.FLOAT],
            TensorProto.BFLOAT16: [TensorProto.BFLOAT16, TensorProto.FLOAT]}
CASTS_OUT = {TensorProto.FLOAT16: [TensorProto.FLOAT16],
             TensorProto.BFLOAT16: [TensorProto.BFLOAT16, TensorProto.FLOAT]}


def upcast_to_float32(proto, label):
    """The model with every float16/bfloat16 initializer, Constant, attribute tensor, value type
    and type attribute (Cast ``to``, ``dtype``...) in float32; the original element types of the
    graph's inputs and outputs are kept in metadata under UPCAST_KEY. Other models are returned
    as they are."""
    if not any(True for _ in _half_sites(proto.graph, label)):
        return proto
    upcast = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)
              if v.type.tensor_type.elem_type in HALF_TYPES}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for site in _half_sites(copy.graph, label):
        _to_float32(site)
    copy.metadata_props.add(key=UPCAST_KEY, value=json.dumps(upcast))
    return copy


def upcast_types(proto):
    """{graph input/output name: original element type} of a model that ``upcast_to_float32`` changed."""
    entry = next((p.value for p in proto.metadata_props if p.key == UPCAST_KEY), None)
    return json.loads(entry) if entry else {}


def _half_sites(graph, label):
    """Every TensorProto, tensor type and type attribute in ``graph`` and its subgraphs that holds
    float16 or bfloat16 (read_model has already read any external data into the tensors)."""
    for g in subgraphs(graph):
        yield from (t for t in graph_tensors(g) if t.data_type in HALF_TYPES)
        for value in list(g.input) + list(g.output) + list(g.value_info):
            yield from _half_types(value.type)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.INT and a.i in HALF_TYPES and a.name in TYPE_ATTRIBUTES:
                    if node.domain not in STANDARD_DOMAINS:
                        raise UnsupportedModelError(
                            f"{label}: node {node.name!r} ({node.domain}.{node.op_type}) has a half-precision "
                            f"attribute {a.name!r}; lrp-onnx upcasts half-precision models to float32 and knows "
                            "this attribute only on standard ops")
                    yield a


def _half_types(type_proto):
    """The tensor types inside a value type (sequences, optionals and maps of tensors included)."""
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(type_proto, kind)
        if inner.elem_type in HALF_TYPES:
            yield inner
    elif kind in ("sequence_type", "optional_type"):
        yield from _half_types(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        yield from _half_types(type_proto.map_type.value_type)


def _to_float32(site):
    if isinstance(site, TensorProto):  # float16 and bfloat16 → float32 is exact
        site.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(site).astype(np.float32), site.name))
    elif isinstance(site, onnx.AttributeProto):
        site.i = TensorProto.FLOAT
    else:  # TypeProto.Tensor or TypeProto.SparseTensor
        site.elem_type = TensorProto.FLOAT


def restore_half_boundary(model, upcast):
    """Give the explainer ``model`` the original's half-precision inputs and outputs (``upcast``,
    from ``upcast_types``): each keeps its name, takes its BOUNDARY_TYPE, and is cast to or from
    the float32 tensor the explainer computes with, which is renamed ``<name>/float32``."""
    if not upcast:
        return
    graph = model.graph
    taken = {t for n in graph.node for t in list(n.input) + list(n.output) + [n.name]} | \
        {v.name for v in list(graph.input) + list(graph.output) + list(graph.initializer)}
    entry, exit_ = [], []
    for values, inward in ((graph.input, True), (graph.output, False)):
        for value in values:
            original = upcast.get(value.name)
            if original is None:
                continue
            inner = _fresh(f"{value.name}/float32", taken)
            _rename(graph, value.name, inner)
            if inward:
                entry += _cast_chain(value.name, inner, CASTS_IN[original], taken)
            else:
                exit_ += _cast_chain(inner, value.name, CASTS_OUT[original], taken)
            value.type.tensor_type.elem_type = BOUNDARY_TYPE[original]
    nodes = entry + list(graph.node) + exit_
    del graph.node[:]
    graph.node.extend(nodes)


def _cast_chain(source, target, types, taken):
    """Cast nodes source → types[0] → ... → types[-1] = target."""
    between = [_fresh(f"{source}/{TensorProto.DataType.Name(t).lower()}", taken) for t in types[:-1]]
    names = [source] + between + [target]
    return [onnx.helper.make_node("Cast", [a], [b], name=_fresh(f"lrp/precision/{b}", taken), to=t)
            for a, b, t in zip(names, names[1:], types)]


def _fresh(name, taken):
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _rename(graph, old, new):
    """Every node of ``graph`` and its subgraphs that reads or writes ``old`` uses ``new`` instead."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename(g, old, new)

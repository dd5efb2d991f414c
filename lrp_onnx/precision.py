"""Half-precision models (float16, bfloat16) are explained in float32.

The load step ``explain_in_float32`` gives the relevance pass a float32 copy of the network:
- a float16 model keeps its own forward, whose float16 ops compute the explainer's outputs as
  they compute the model's, and gains a float32 mirror of it (``mirror_float16_forward``: every node
  again, on the weights upcast, with tensors named ``name + MIRROR`` as quantized.py's mirror
  names them), which the rules read. The class explained by default is the model's own
  prediction; its relevance is the float32 mirror's.
- a bfloat16 model is upcast to float32 throughout (``upcast_to_float32``), and
  ``restore_half_boundary`` gives the explainer the original's inputs and outputs back: ONNX
  Runtime's CPU provider has no bfloat16 kernel for Conv, Gemm, MatMul, Add, Mul, Div, Sum, Relu,
  MaxPool or Softmax ("Could not find an implementation"), only for Cast, so the model's own
  bfloat16 forward could not run there.

Why float32 and not a half-precision relevance pass:
- LRP divides relevance by stabilised pre-activations: R/(z + ε·sign z). float16 spans 6e-8
  (smallest subnormal) to 65504: with Zennit's ε = 1e-6, a z at or near 0 makes the ratio up to
  R·1e6, inf for any R above 0.066. An ε that can never overflow (≥ max|R|/65504) depends on the
  relevance's scale and changes the rule's result, so a float16 pass cannot keep Zennit's
  semantics.
- Upcasting float16 (or bfloat16) to float32 is exact, so the relevance of a half-precision model
  is the float32 explainer's of the very same weights.
The cost: the explainer holds the weights in float32 too (a float16 one also in float16), so its
file is two to three times the original's size, and a float16 model's forward runs twice.
"""

import json

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import UnsupportedModelError
from .external import graph_tensors, subgraphs
from .quantized import MIRROR

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
CASTS_IN = {TensorProto.FLOAT16: [TensorProto.FLOAT], TensorProto.BFLOAT16: [TensorProto.BFLOAT16, TensorProto.FLOAT]}
CASTS_OUT = {
    TensorProto.FLOAT16: [TensorProto.FLOAT16],
    TensorProto.BFLOAT16: [TensorProto.BFLOAT16, TensorProto.FLOAT],
}


def explain_in_float32(proto, label):
    """The load step: a float16 model with a float32 mirror of its forward, a bfloat16 one (or one
    holding both types) upcast to float32; other models as they are (see the module docstring)."""
    sites = list(_half_sites(proto.graph, label))
    if not sites:
        return proto
    if any(_half_type(site) == TensorProto.BFLOAT16 for site in sites):
        return upcast_to_float32(proto, label)
    return mirror_float16_forward(proto, label)


def mirror_float16_forward(proto, label):
    """The float16 model with a float32 copy of every node appended. The copy reads the upcast
    weights and float16 inputs cast to float32, its tensors are ``name + MIRROR``, and its nodes
    take the original node names (which rules and messages use) while the originals become
    ``name + MIRROR``, as in quantized.mirror_qdq_forward."""
    upcast = upcast_to_float32(proto, label).graph
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inputs = [v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT16]
    halves = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    mirror = {
        name: name + MIRROR
        for name in [o for n in graph.node for o in n.output if o]
        + inputs
        + [t.name for t in halves]
        + [s.values.name for s in graph.sparse_initializer if s.values.data_type == TensorProto.FLOAT16]
    }
    taken = {t for n in graph.node for t in list(n.input) + list(n.output) + [n.name]} | {
        v.name for v in list(graph.input) + list(graph.initializer)
    }
    if taken & set(mirror.values()):
        raise UnsupportedModelError(
            f"{label}: the model already has tensors ending in {MIRROR!r}, which lrp-onnx "
            "gives the float32 copy of a float16 model"
        )
    casts = [
        onnx.helper.make_node("Cast", [name], [mirror[name]], name=f"lrp/precision/{name}", to=TensorProto.FLOAT)
        for name in inputs
    ]
    copies = []
    for node in upcast.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        _rename_all(copy, mirror)
        copies.append(copy)
    for node in graph.node:
        node.name += MIRROR if node.name else ""
    upcast_weights = {t.name: t for t in upcast.initializer}
    for t in halves:
        graph.initializer.append(upcast_weights[t.name])
        graph.initializer[-1].name = mirror[t.name]
    for sparse in upcast.sparse_initializer:
        if sparse.values.name in mirror:
            graph.sparse_initializer.append(sparse)
            graph.sparse_initializer[-1].values.name = mirror[sparse.values.name]
    for value in list(upcast.value_info) + list(upcast.output):
        if value.name in mirror:
            graph.value_info.add().CopyFrom(value)
            graph.value_info[-1].name = mirror[value.name]
    # Until release_mirror_outputs, the mirror's outputs are graph outputs too, so that the load
    # steps' cleanups, which keep only what the graph's outputs need, keep the mirror.
    mirror_outputs = {mirror[o.name] for o in upcast.output if o.name in mirror}
    graph.output.extend(v for v in graph.value_info if v.name in mirror_outputs)
    nodes = casts + list(graph.node) + copies
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def release_mirror_outputs(graph):
    """The graph step that ends what mirror_float16_forward began: the mirror's outputs are graph
    outputs no more (the relevance pass reads the mirror, the caller the model's own outputs)."""
    graph.outputs = [t for t in graph.outputs if not t.name.endswith(MIRROR)]


def _half_type(site):
    if isinstance(site, TensorProto):
        return site.data_type
    return site.i if isinstance(site, onnx.AttributeProto) else site.elem_type


def upcast_to_float32(proto, label):
    """The model with every float16/bfloat16 initializer, Constant, attribute tensor, value type
    and type attribute (Cast ``to``, ``dtype``...) in float32; the original element types of the
    graph's inputs and outputs are kept in metadata under UPCAST_KEY. Other models are returned
    as they are."""
    if not any(True for _ in _half_sites(proto.graph, label)):
        return proto
    upcast = {
        v.name: v.type.tensor_type.elem_type
        for v in list(proto.graph.input) + list(proto.graph.output)
        if v.type.tensor_type.elem_type in HALF_TYPES
    }
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
                            "this attribute only on standard ops"
                        )
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
    taken = {t for n in graph.node for t in list(n.input) + list(n.output) + [n.name]} | {
        v.name for v in list(graph.input) + list(graph.output) + list(graph.initializer)
    }
    entry, exit_ = [], []
    for values, inward in ((graph.input, True), (graph.output, False)):
        for value in values:
            original = upcast.get(value.name)
            if original is None:
                continue
            inner = _fresh(f"{value.name}/float32", taken)
            for node in graph.node:
                _rename_all(node, {value.name: inner})
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
    return [
        onnx.helper.make_node("Cast", [a], [b], name=_fresh(f"lrp/precision/{b}", taken), to=t)
        for a, b, t in zip(names, names[1:], types)
    ]


def _fresh(name, taken):
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _rename_all(node, names):
    """``node`` and the nodes of its subgraphs read and write ``names[t]`` for each tensor t in ``names``."""
    for listed in (node.input, node.output):
        for i, name in enumerate(listed):
            listed[i] = names.get(name, name)
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for inner in g.node:
                _rename_all(inner, names)

"""Read and validate a model, then canonicalise it: the steps of PROTO_STEPS and GRAPH_STEPS.

Each step leaves the model's outputs unchanged (tests/test_load.py checks every one)."""

import contextlib
import functools
import hashlib
import heapq
import importlib.util
import math
import mmap
import os
import warnings
from typing import Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError, EncodeError
from onnx import version_converter

from .errors import InputError, ModelLoadError, ModelWarning, UnsupportedModelError, first_line
from .external import (
    check_tensor_sizes,
    holding_large_weights,
    is_repeated,
    load_external_data,
    require_loaded,
    without_large_weights,
)
from .fused import expand_fused_ops
from .precision import explain_in_float32, release_mirror_outputs
from .quantized import QUANTIZERS, mirror_qdq_forward, read_quantized_weights, shape_twin

# A model as the API takes it: a path, the file's bytes, or a ModelProto
ModelSource = Union[str, "os.PathLike[str]", bytes, onnx.ModelProto]

MIN_OPSET = 13
# The backward of a Gather with computed indices and of every GatherND scatter-adds into the input
# (ScatterElements or ScatterND with reduction="add", opset 16).
SCATTER_OPSET = 16


def model_label(model):
    """How errors name ``model``: its path, or what kind of object it was given as."""
    if isinstance(model, onnx.ModelProto):
        return "<model>"
    return "<bytes>" if isinstance(model, bytes) else os.fspath(model)


def check_strings(proto, label):
    """Every string field of the model (names, op types, attributes, shapes' dim_params...) is UTF-8.
    Protobuf does not check this while parsing and hands over a string that is not as bytes, which
    the checker, graphsurgeon and onnx.helper each trip over in their own way."""
    pending = [proto]
    while pending:
        message = pending.pop()
        for field in message.DESCRIPTOR.fields:  # not ListFields: it would copy every tensor's bytes
            if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
                continue
            if is_repeated(field):
                values = getattr(message, field.name)
            else:
                values = [getattr(message, field.name)] if message.HasField(field.name) else []
            if field.type == field.TYPE_MESSAGE:
                pending.extend(values)
                continue
            bad = next((v for v in values if not isinstance(v, str)), None)
            if bad is not None:
                raise ModelLoadError(f"{label}: {message.DESCRIPTOR.name}.{field.name} {bad!r} is not UTF-8")


# Wire-format field numbers on the way from a ModelProto down to a subgraph: ModelProto.graph,
# GraphProto.node, NodeProto.attribute, AttributeProto.g and AttributeProto.graphs.
SUBGRAPH_PATH = {
    "model": {7: "graph"},
    "graph": {1: "node"},
    "node": {5: "attribute"},
    "attribute": {6: "graph", 11: "graph"},
}
# The protobuf parser refuses messages nested past its recursion limit of 100; each level of
# subgraph nests three (graph, node, attribute), so 33 levels is as deep as a file can go.
PROTOBUF_SUBGRAPH_LIMIT = 33


def subgraph_depth(data):
    """How many levels of subgraphs serialized ModelProto ``data`` nests (0: none), read from the
    wire format, for a file the protobuf parser refused; stops quietly at bytes it cannot read."""
    deepest, pending = 0, [("model", 0, len(data), -1)]
    while pending:
        kind, at, end, depth = pending.pop()
        while at < end:
            key, at = _read_varint(data, at)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, at = _read_varint(data, at)
            elif wire_type in (1, 5):
                at += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, at = _read_varint(data, at)
                child = SUBGRAPH_PATH[kind].get(number)
                if child is not None and at + size <= end:
                    deeper = depth + (child == "graph")
                    deepest = max(deepest, deeper)
                    pending.append((child, at, at + size, deeper))
                at += size
            else:
                break
    return deepest


def _read_varint(data, at):
    value, shift = 0, 0
    while at < len(data):
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            break
    return value, at


def refused_parse(label, error, what, data=b""):
    """The ModelLoadError for a model that did not parse: subgraphs nested past protobuf's limit
    in ``data`` are named as such (protobuf's own message says so in some releases and not in
    others), anything else is ``what`` with the parser's message."""
    depth = subgraph_depth(data)
    if depth > PROTOBUF_SUBGRAPH_LIMIT:
        return ModelLoadError(
            f"{label}: subgraphs nested {depth} deep; protobuf parses at most {PROTOBUF_SUBGRAPH_LIMIT} levels"
        )
    return ModelLoadError(f"{label}: {what} ({first_line(error)})")


def read_model(model, held=None):
    """A ModelProto from a path, bytes or a ModelProto; every failure is one ModelLoadError line.
    External data is read only from a path, and only after ``external.load_external_data`` has
    checked that it lies inside the model's folder (an UnsafeModelError otherwise). With ``held``
    (a HeldWeights), the large initializers go there instead (``external.holding_large_weights``),
    and the proto is a copy: a ModelProto given is never changed."""
    label = model_label(model)
    path = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, bytes):
        try:
            proto = onnx.load_from_string(model)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise refused_parse(label, e, "not an ONNX model", model) from None
    else:
        if not os.path.isfile(label):
            raise ModelLoadError(f"{label}: no such file")
        if os.path.getsize(label) == 0:  # onnx reads 0 bytes as an empty model, without complaint
            raise ModelLoadError(f"{label}: the file is empty (0 bytes)")
        try:
            proto = onnx.load(label, load_external_data=False)
        except DecodeError as e:  # read the bytes once more, only to measure their nesting
            with open(label, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                raise refused_parse(label, e, "not an ONNX model, or truncated", data) from None
        except (RuntimeError, ValueError, OSError) as e:
            raise refused_parse(label, e, "not an ONNX model, or truncated") from None
        path = label  # its external data lies beside it
    check_strings(proto, label)
    if held is not None:
        proto = holding_large_weights(proto, held, path)
    if path is not None:
        load_external_data(proto, path, held)
    require_loaded(proto, label, held)
    return proto, label


def source_digest(model):
    """SHA-256 of the model as given (the file's bytes for a path), for the explainer's metadata;
    None for a ModelProto past protobuf's 2 GB limit, which has no bytes to hash."""
    digest = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        try:
            digest.update(model.SerializeToString())
        except EncodeError:
            return None
    elif isinstance(model, bytes):
        digest.update(model)
    else:
        with open(model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def ai_onnx_opset(proto):
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_model(model, held=None, input_shapes=None):
    """Validated, canonical ModelProto and a label for error messages: the file-level checks, the
    full ONNX check, then the steps of PROTO_STEPS, in order (the graph-level ones follow in
    ``import_graph``). ``held``: as ``read_model``; ``input_shapes``: as ``pin_input_shapes``."""
    proto, label = read_model(model, held)
    if input_shapes:
        proto = pin_input_shapes(proto, input_shapes, label)
    if not proto.graph.node:
        raise ModelLoadError(f"{label}: the model has no nodes (empty, truncated or not an ONNX file)")
    check_tensor_sizes(proto, label)
    check_declared_shapes(proto, label)
    check_opset_imports(proto, label)
    proto = sort_nodes(proto, label)
    # before the checker: it does not know SimplifiedLayerNormalization, which ORT registers in the standard domain
    proto = expand_fused_ops(proto, label)
    proto, repairs = declare_output_shapes(proto, label)
    check_model(proto, label)
    for repair in repairs:  # only once the whole model has passed: a refused one is not "converting"
        warnings.warn(ModelWarning(repair))
    for step in PROTO_STEPS:
        proto = step(proto, label)
    return proto, label


def pin_input_shapes(proto, shapes, label):
    """The model with the graph inputs named in ``shapes`` ({name: [dims]}) declared with those
    dims: a number pins a size, a name keeps it symbolic (as polygraphy's and onnxsim's input
    shape options do). Static sizes the model declares must be kept; the caller's model is not
    changed."""
    proto = _copy(proto)
    inputs = {i.name: i for i in proto.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputError(f"{label}: --shape names {name!r}, which is no graph input; inputs are {list(inputs)}")
        declared = inputs[name].type.tensor_type.shape
        if len(declared.dim) != len(dims):
            raise InputError(
                f"{label}: --shape gives {name!r} {len(dims)} dims; it has {len(declared.dim)} {_dims(declared)}"
            )
        for dim, value in zip(declared.dim, dims):
            if isinstance(value, int) and dim.HasField("dim_value") and dim.dim_value != value:
                raise InputError(
                    f"{label}: --shape {name}={_listed(dims)} changes the static size {dim.dim_value} "
                    f"of {_dims(declared)}"
                )
            if isinstance(value, int):
                if value < 1:
                    raise InputError(f"{label}: --shape {name}={_listed(dims)}: sizes must be at least 1")
                dim.dim_value = value
            elif not dim.HasField("dim_value"):
                dim.dim_param = value
    return proto


def _listed(dims):
    return ",".join(map(str, dims))


def sort_nodes(proto, label):
    """The model with its nodes in topological order, as the ONNX checker requires and ONNX Runtime
    does not (it sorts them itself): ONNX Runtime's float16 converter, for one, appends the Casts it
    puts on the inputs after the nodes that read them. Nodes already in order stay in place, and so
    does the caller's model; a cycle is a ModelLoadError. Subgraphs are sorted too."""
    if _sorted(proto.graph, set()):
        return proto
    proto = _copy(proto)
    _sort_graph(proto.graph, set(), label)
    return proto


def _available(graph, outer):
    """Names a graph's nodes may read before any node runs: its inputs, initializers, the outer
    scope's names (for a subgraph), and the empty name of an absent optional input."""
    return (
        outer
        | {""}
        | {i.name for i in graph.input}
        | {t.name for t in graph.initializer}
        | {t.values.name for t in graph.sparse_initializer}
    )


def _subgraphs(node):
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def _sorted(graph, outer):
    known = _available(graph, outer)
    for node in graph.node:
        if not known.issuperset(node.input) or not all(_sorted(g, known) for g in _subgraphs(node)):
            return False
        known.update(node.output)
    return True


def _sort_graph(graph, outer, label):
    """Kahn's algorithm, always taking the earliest ready node, so that runs already in order keep
    it. A subgraph's reads of outer names count as its node's inputs."""
    nodes = list(graph.node)
    producer = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    dependents, waiting = [[] for _ in nodes], []
    for k, node in enumerate(nodes):
        needed = {
            producer[i]
            for i in list(node.input) + [r for g in _subgraphs(node) for r in _reads(g)]
            if i in producer and producer[i] != k
        }
        waiting.append(len(needed))
        for j in needed:
            dependents[j].append(k)
    ready = [k for k, count in enumerate(waiting) if not count]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for j in dependents[k]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        stuck = next(nodes[k] for k, count in enumerate(waiting) if count)
        raise ModelLoadError(f"{label}: the graph has a cycle through node {stuck.name!r} ({stuck.op_type})")
    known = _available(graph, outer) | set(producer)
    for node in order:
        for g in _subgraphs(node):
            _sort_graph(g, known, label)
    copies = [_copied_node(n) for n in order]
    del graph.node[:]
    graph.node.extend(copies)


def _reads(graph):
    """Every name a graph's nodes read, its subgraphs' included."""
    return {i for node in graph.node for i in node.input} | {
        r for node in graph.node for g in _subgraphs(node) for r in _reads(g)
    }


def _copied_node(node):
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def check_model(proto, label):
    """The ONNX checker's full check, which infers shapes strictly: declared shapes must agree with
    the ops and weights."""
    try:
        without_large_weights(lambda shell: onnx.checker.check_model(shell, full_check=True), proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        # ValueError: an element type that does not exist
        raise ModelLoadError(f"{label}: fails the ONNX checker: {first_line(e)}") from None


INT64_MAX = 2**63 - 1


def check_declared_shapes(proto, label):
    """Every graph input declares a shape, and the declared dims of graph inputs, outputs and
    value_info are >= 0, with a product that fits int64: ONNX Runtime computes buffer sizes from them.
    ONNX Runtime takes an input without a shape as one of any rank, but nothing can infer that
    rank: the full check could not run, and the relevance output, shaped like the input, would
    have none."""
    shapeless = next((i.name for i in proto.graph.input if _declares_no_shape(i)), None)
    if shapeless is not None:
        raise ModelLoadError(f"{label}: input {shapeless!r} declares no shape; lrp-onnx needs the rank of every input")
    for info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise ModelLoadError(f"{label}: tensor {info.name!r} declares negative dims {dims}")
        if math.prod(dims) > INT64_MAX:
            raise ModelLoadError(f"{label}: tensor {info.name!r} declares dims {dims}, whose product overflows int64")


def _declares_no_shape(info):
    """A value info with no type, or a tensor type without a shape field (which an empty shape,
    a scalar's, is not)."""
    if not info.HasField("type"):
        return True
    return info.type.HasField("tensor_type") and not info.type.tensor_type.HasField("shape")


def declare_output_shapes(proto, label):
    """Graph outputs declared without a shape, or without a type, declared with the shape that
    inference finds: the model, and a warning per output. ONNX Runtime runs such a model (it takes
    the shape from the graph) and the conversion needs no declared shape, but the ONNX checker
    requires one on every output of the main graph, and stops at its first complaint. So the
    model is checked without those outputs (inference runs only on a checked model), then they
    are declared, for ``check_model`` to see the whole model: a declared element type that the
    graph contradicts, or none, is still refused, as ONNX Runtime refuses it. The explainer copies
    the declared types, so its own check passes as well. The caller's model is left as it was."""
    names = {o.name for o in proto.graph.output if _declares_no_shape(o)}
    if not names:
        return proto, []
    declared = without_large_weights(lambda shell: _declare_inferred_shapes(shell, names, label), proto)
    shapes = {o.name: o.type.tensor_type.shape for o in declared.graph.output}
    return declared, [
        f"{label}: output {o.name!r} declares no {'shape' if o.HasField('type') else 'type'}, which the "
        "ONNX checker requires (ONNX Runtime does not); converting with the inferred shape "
        f"{_dims(shapes[o.name])}"
        for o in proto.graph.output
        if o.name in names
    ]


def _declare_inferred_shapes(shell, names, label):
    """``declare_output_shapes`` on the shell of ``without_large_weights``."""
    rest = _copy(shell)
    del rest.graph.output[:]
    rest.graph.output.extend(o for o in shell.graph.output if o.name not in names)
    check_model(rest, label)
    inferred = infer_shapes(shell, label)  # which fills in the graph outputs' shapes
    types = {o.name: o.type for o in inferred.graph.output}
    declared = _copy(shell)
    for output in declared.graph.output:
        if output.name not in names:
            continue
        found = types.get(output.name)
        if found is None or not found.tensor_type.HasField("shape"):
            raise ModelLoadError(
                f"{label}: output {output.name!r} declares no shape, which the ONNX checker "
                "requires, and shape inference finds none"
            )
        if output.HasField("type"):  # its element type stays, for check_model to compare with the graph's
            output.type.tensor_type.shape.CopyFrom(found.tensor_type.shape)
        else:
            output.type.CopyFrom(found)
    return declared


def _dims(shape):
    dims = [
        d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?" for d in shape.dim
    ]
    return f"[{', '.join(map(str, dims))}]"


def check_opset_imports(proto, label):
    """One version per domain: the checker lets a domain imported at two versions through, and the
    opset converter and the explainer would then disagree on which one the model means. (The
    same version twice, as skl2onnx writes "" and "ai.onnx", is harmless.)"""
    versions = {}
    for o in proto.opset_import:
        versions.setdefault("" if o.domain == "ai.onnx" else o.domain, set()).add(o.version)
    ambiguous = sorted(d for d, v in versions.items() if len(v) > 1)
    if ambiguous:
        raise ModelLoadError(f"{label}: imports opset domain(s) {ambiguous} at more than one version")


def drop_initializer_inputs(proto, label):
    """IR version 3 files (Caffe2 exports) list every initializer as a graph input too. Those are
    weights, not inputs: drop them from the inputs so that folding treats them as constants."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) == len(proto.graph.input):
        return proto
    proto = _copy(proto)
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto.ir_version = max(proto.ir_version, 4)  # IR 4 is the first that allows this
    return proto


def upgrade_opset(proto, label):
    """Convert to opset >= 13 (the opset the propagators are written for), >= 16 where a backward
    pass scatter-adds: GatherND, Gather with indices that are computed rather than constant, and
    MaxPool on an input with a dynamic size past the batch (a dynamic image)."""
    opset = ai_onnx_opset(proto)
    target = max(opset, MIN_OPSET)
    constants = {t.name for t in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output
    }
    dynamic_image = any(
        not d.HasField("dim_value")
        for i in proto.graph.input
        if i.name not in constants
        for d in i.type.tensor_type.shape.dim[1:]
    )
    if any(
        n.op_type == "GatherND"
        or (n.op_type == "Gather" and n.input[1] not in constants)
        or (n.op_type == "MaxPool" and dynamic_image)
        for n in proto.graph.node
    ):
        target = max(target, SCATTER_OPSET)
    if target == opset:
        return proto
    try:
        return without_large_weights(lambda shell: version_converter.convert_version(shell, target), proto)
    except Exception as e:  # the converter raises bare RuntimeErrors and more
        raise ModelLoadError(f"{label}: cannot upgrade opset {opset} to {target}: {first_line(e)}") from None


def infer_shapes(proto, label):
    """Shapes and types of every tensor. ONNX's own inference (with constant propagation) goes
    first, and stands where it leaves no size unknown but the inputs' symbolic ones (most CNNs,
    in tens of milliseconds). Otherwise ONNX Runtime's symbolic inference runs: it follows shape
    arithmetic (Shape → Gather → Div → Concat → Reshape, as in a channel shuffle) with a dynamic
    batch, which keeps channel counts static so that folding can turn such shape sub-graphs into
    constants. It needs sympy, whose import alone took 0.4 s of vgg16's conversion. Where it
    cannot infer every shape either, ONNX's result stands."""

    def infer(shell):
        try:
            onnx_inferred, failure = _onnx_shapes(shell, label), None
        except ModelLoadError as e:  # raised only if ORT's inference fails too
            onnx_inferred, failure = None, e
        if onnx_inferred is not None and _shapes_complete(onnx_inferred):
            return onnx_inferred
        inferred = _symbolic_shapes(shell)
        if inferred is None and _tensors_only(shell):
            # ORT's inference stops at a Reshape whose target is computed from constants alone
            # (TorchScript's unflatten of nn.MultiheadAttention's packed qkv): fold them first
            inferred = _symbolic_shapes(_constants_folded(shell))
        if inferred is not None:
            return inferred
        if failure is not None:
            raise failure
        return onnx_inferred

    return without_large_weights(infer, proto)


def _shapes_complete(proto):
    """Whether every node output of the main graph has a tensor type whose sizes are numbers or
    symbolic sizes of the graph's inputs."""
    graph = proto.graph
    given = {
        d.dim_param
        for i in graph.input
        if i.type.HasField("tensor_type")
        for d in i.type.tensor_type.shape.dim
        if d.dim_param
    }
    known = {v.name: v.type for v in list(graph.value_info) + list(graph.output)}
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            if (
                name not in known
                or not known[name].HasField("tensor_type")
                or not known[name].tensor_type.HasField("shape")
            ):
                return False
            if any(not d.HasField("dim_value") and d.dim_param not in given for d in known[name].tensor_type.shape.dim):
                return False
    return True


def _tensors_only(proto):
    """No sequence or map inputs and outputs (ZipMap's): graphsurgeon would lose their types."""
    return all(v.type.HasField("tensor_type") for v in list(proto.graph.input) + list(proto.graph.output))


def _constants_folded(proto):
    graph = gs.import_onnx(proto)
    fold_constants(graph)
    folded = gs.export_onnx(graph, do_type_check=False)
    folded.ir_version = proto.ir_version
    folded.metadata_props.extend(proto.metadata_props)
    return folded


def _onnx_shapes(proto, label):
    """ONNX's inference; on a model with QOperator nodes, on its standard-op twin (quantized.py),
    whose shapes of the model's own tensors are then the model's."""
    twin = shape_twin(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(twin or proto, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise ModelLoadError(f"{label}: shape inference failed: {first_line(e)}") from None
    if twin is None:
        return inferred
    names = {name for node in proto.graph.node for name in node.output}
    shaped = _copy(proto)
    del shaped.graph.value_info[:]
    shaped.graph.value_info.extend(v for v in inferred.graph.value_info if v.name in names)
    return shaped


def _symbolic_shapes(proto):
    """``SymbolicShapeInference.infer_shapes`` without its failure path, which saves the model to
    ``sym_shape_infer_temp.onnx`` in the working directory; None where it cannot infer every shape,
    or where sympy, which it needs and onnxruntime does not install, is missing. Also None for
    graphs with subgraphs (If, Loop, Scan): it re-infers each body for every pass over its parent,
    which grows exponentially with the nesting depth (a fuzzed file with 24 nested If bodies hung)."""
    if any(attr.HasField("g") or attr.graphs for node in proto.graph.node for attr in node.attribute):
        return None
    try:
        inference = _symbolic_shape_inference()(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        inference._preprocess(proto)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception:  # no sympy, ops it does not know, a changed private API: ONNX's inference takes over
        return None
    return inference.out_mp_ if complete else None


@functools.lru_cache(maxsize=1)
def _symbolic_shape_inference():
    """ORT's SymbolicShapeInference class, loaded from its file: importing it as a module of
    ``onnxruntime.tools`` runs that package's __init__, which imports torch wherever torch is
    installed (1.3 s and 500 MB for each conversion, measured on this machine)."""
    path = os.path.join(os.path.dirname(ort.__file__), "tools", "symbolic_shape_infer.py")
    spec = importlib.util.spec_from_file_location("lrp_onnx._symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


PROTO_STEPS = (drop_initializer_inputs, explain_in_float32, upgrade_opset, infer_shapes)


def import_graph(proto, held=None):
    """The graph after GRAPH_STEPS: ML classifiers in standard ops, constant sub-graphs (weight
    chains, ConstantOfShape weights, static shape arithmetic) folded, no-op nodes gone, and every
    node uniquely named (rules, errors and emitted nodes are keyed by node name). The weights
    that ``held`` holds are read-only arrays over its bytes."""
    graph = gs.import_onnx(proto)
    if held is not None:
        references = {t.name: t for t in proto.graph.initializer if held.holds(t)}
        # a weight that only a subgraph reads is not among the main graph's tensors
        for constant in (
            t
            for g in [graph, *graph.subgraphs(recursive=True)]
            for t in g.tensors().values()
            if t.name in references and isinstance(t, gs.Constant)
        ):
            # the values are in memory: exported again, they are not external data
            constant.values, constant.data_location = held.array_of(references[constant.name]), None
    for step in GRAPH_STEPS:
        step(graph)
    return graph


def expand_linear_classifiers(graph):
    """ai.onnx.ml LinearClassifier (skl2onnx's linear models) as standard ops:
    scores = post(X·Wᵀ + b), label = classlabels[argmax(scores)], so the linear layer is a Gemm
    a rule can see, and relevance starts at its output, below the post-transform."""
    for node in [n for n in graph.nodes if n.op == "LinearClassifier"]:
        x, (label, scores) = node.inputs[0], node.outputs
        labels = node.attrs.get("classlabels_ints") or node.attrs.get("classlabels_strings")
        intercepts = np.asarray(node.attrs.get("intercepts", [0.0] * len(labels)), np.float32)
        weight = np.asarray(node.attrs["coefficients"], np.float32).reshape(len(intercepts), -1)
        post = node.attrs.get("post_transform", "NONE")
        post = post.decode() if isinstance(post, bytes) else post
        if post not in CLASSIFIER_POST_TRANSFORMS or len(intercepts) != len(labels):
            raise UnsupportedModelError(
                f"node {node.name!r} (LinearClassifier): post_transform {post} with {len(intercepts)} score "
                f"column(s) for {len(labels)} labels is not supported; supported: one column per class and "
                f"post_transform {', '.join(CLASSIFIER_POST_TRANSFORMS)}"
            )
        name = node.name or label.name
        logits = gs.Variable(f"{name}/logits", dtype=np.float32)
        nodes = [
            gs.Node(
                "Gemm",
                f"{name}/gemm",
                {"transB": 1},
                [x, gs.Constant(f"{name}/weight", weight), gs.Constant(f"{name}/intercepts", intercepts)],
                [logits],
            )
        ]
        op = CLASSIFIER_POST_TRANSFORMS[post]
        nodes.append(
            gs.Node(op or "Identity", f"{name}/post", {"axis": 1} if op == "Softmax" else {}, [logits], [scores])
        )
        best = gs.Variable(f"{name}/argmax", dtype=np.int64)
        nodes.append(gs.Node("ArgMax", f"{name}/argmax", {"axis": 1, "keepdims": 0}, [scores], [best]))
        nodes.append(
            gs.Node("Gather", f"{name}/label", {}, [_labels_constant(f"{name}/classlabels", labels), best], [label])
        )
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend(nodes)
    graph.cleanup().toposort()


def _labels_constant(name, labels):
    """Class labels, ints or strings, as a constant (graphsurgeon writes strings only from a TensorProto)."""
    if isinstance(labels[0], int):
        return gs.Constant(name, np.array(labels, np.int64))
    proto = onnx.helper.make_tensor(name, onnx.TensorProto.STRING, [len(labels)], labels)
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


# LinearClassifier post_transform -> the standard op that computes it (None: no op)
CLASSIFIER_POST_TRANSFORMS = {"NONE": None, "SOFTMAX": "Softmax", "LOGISTIC": "Sigmoid"}


def fold_constants(graph):
    """Evaluate every sub-graph that depends on no graph input (run once, by ONNX Runtime), and
    shape arithmetic on the static dimensions of dynamic-batch tensors. Quantize- and
    DequantizeLinear nodes stay: a runtime runs a layer whose weight is DequantizeLinear(int8) in
    integers, so folding the weight to floats would change what the forward computes
    (``read_quantized_weights`` reads their values instead)."""
    with _quiet_ort_logs():
        graph.fold_constants(error_ok=True, should_exclude_node=lambda node: node.op in QUANTIZERS).cleanup()


@contextlib.contextmanager
def _quiet_ort_logs():
    """ORT's optimiser warns about the throw-away sessions that folding runs: not for users."""
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def drop_identities(graph):
    """Identity and inference-mode Dropout compute nothing: their readers read the input instead.
    One that produces a graph output stays, so that output keeps its name."""
    outputs = {t.name for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
        y = node.outputs[0]
        training = node.inputs[2] if node.op == "Dropout" and len(node.inputs) > 2 else None
        if (
            any(t.name in outputs for t in node.outputs)
            or any(t.outputs for t in node.outputs[1:])
            or (training is not None and not (isinstance(training, gs.Constant) and not training.values.any()))
        ):
            continue
        x = node.inputs[0]
        for reader in list(y.outputs):
            for i, t in enumerate(reader.inputs):
                if t is y:
                    reader.inputs[i] = x
        node.outputs.clear()
    graph.cleanup().toposort()


def name_nodes(graph):
    """Give unnamed nodes ``<op>_<index>`` and make duplicate names unique with a suffix."""
    seen = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


GRAPH_STEPS = (
    expand_linear_classifiers,
    fold_constants,
    read_quantized_weights,
    drop_identities,
    name_nodes,
    release_mirror_outputs,
    mirror_qdq_forward,
)


def _copy(proto):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy

"""Read and validate a model, upgrade old opsets, infer shapes, fold constant sub-graphs."""

import os

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import ModelLoadError

MIN_OPSET = 13
# MaxPool's backward scatter-adds into the input (ScatterElements reduction="add", opset 16).
MAX_POOL_OPSET = 16


def read_model(model):
    """A ModelProto from a path, bytes or a ModelProto; every failure is one ModelLoadError line."""
    if isinstance(model, onnx.ModelProto):
        return model, "<model>"
    if isinstance(model, bytes):
        label = "<bytes>"
        try:
            proto = onnx.load_from_string(model)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{label}: not an ONNX model ({_first_line(e)})") from None
    else:
        label = os.fspath(model)
        if not os.path.isfile(label):
            raise ModelLoadError(f"{label}: no such file")
        try:
            proto = onnx.load(label)
        except (DecodeError, RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"{label}: not an ONNX model, or truncated ({_first_line(e)})") from None
    return proto, label


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def ai_onnx_opset(proto):
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_model(model):
    """Validated, opset-upgraded, shape-inferred ModelProto and a label for error messages."""
    proto, label = read_model(model)
    if not proto.graph.node:
        raise ModelLoadError(f"{label}: the model has no nodes (empty, truncated or not an ONNX file)")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(f"{label}: fails the ONNX checker: {_first_line(e)}") from None
    opset = ai_onnx_opset(proto)
    target = max(opset, MIN_OPSET)
    if any(n.op_type == "MaxPool" for n in proto.graph.node):
        target = max(target, MAX_POOL_OPSET)
    if target != opset:
        try:
            proto = version_converter.convert_version(proto, target)
        except Exception as e:  # the converter raises bare RuntimeErrors and more
            raise ModelLoadError(f"{label}: cannot upgrade opset {opset} to {target}: {_first_line(e)}") from None
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise ModelLoadError(f"{label}: shape inference failed: {_first_line(e)}") from None
    return proto, label


def import_graph(proto):
    """The graph with constant sub-graphs (weight Identity chains, shape arithmetic) folded and
    every node uniquely named (rules, errors and emitted nodes are keyed by node name)."""
    graph = gs.import_onnx(proto)
    computed = _computed_nodes(graph)
    graph.fold_constants(error_ok=True).cleanup()
    if _computed_nodes(graph) < computed:
        graph = gs.import_onnx(_infer_folded_shapes(gs.export_onnx(graph)))
    graph.toposort()
    name_nodes(graph)
    return graph


def _computed_nodes(graph):
    return sum(node.op != "Constant" for node in graph.nodes)


def _infer_folded_shapes(proto):
    """Shapes inferred again after a constant sub-graph was folded. Pads or shapes it computed
    (torch's ZeroPad2d: ConstantOfShape → Slice → Transpose → Pad) are opaque to the first
    inference, which leaves every later spatial size unknown; a strided Conv needs them. The
    stale intermediate shapes are dropped first, or inference would keep them. Only then: on
    resnet50, inference costs as much as the rest of the conversion."""
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, data_prop=True)


def name_nodes(graph):
    """Give unnamed nodes ``<op>_<index>`` and make duplicate names unique with a suffix."""
    seen = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)

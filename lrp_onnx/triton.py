"""Triton Inference Server export: an explainer as a model repository entry.

``export_triton`` writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` (plus
``model.onnx.data`` when the explainer keeps its weights beside it). Only explainers are exported:
the composite, rules and method are chosen at ``convert`` and recorded in the graph's metadata,
so a deployment step that converted on the fly would need every rule flag again.

Two backends: ``onnxruntime`` (Triton's ORT backend runs the graph itself) and ``python`` (a
``model.py`` hosting an ONNX Runtime session, for servers built without the ORT backend, such as
the one in pip's nvidia-pytriton). The ONNX graph requires ``target`` (int64, -1 = the predicted
class), so the ORT backend declares it required; the Python backend fills in -1 where a request
leaves it out, and declares it optional.

Triton's dims leave out the batch axis. A per-sample scalar, ONNX shape [N], becomes
``dims: [1]`` with ``reshape: { shape: [] }``: Triton has no zero-rank dims with batching.
"""

import os
import re
import shutil
import tempfile

import onnx
from onnx import TensorProto

from .emit import is_explainer
from .errors import InputError, OutputError
from .external import DATA_SUFFIX, external_files, wants_external_data
from .io.files import _umask, atomic_write, writable_folder
from .load import read_model
from .plan import TARGET
from .runtime import save_model

BACKENDS = ("onnxruntime", "python")
VERSION = "1"
MODEL_FILE = "model.onnx"
# Long enough for concurrent clients' requests to meet in one batch, short next to an explainer's run.
QUEUE_DELAY_US = 500
DATA_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.STRING: "TYPE_STRING",
}
# Triton's model names are folder names; this keeps them portable and free of path tricks.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# The Python backend's model: one ONNX Runtime session; the requests Triton's dynamic batcher
# hands over together are concatenated into one run where their shapes allow, then split again.
PYTHON_MODEL = '''"""Triton Python backend: an lrp-onnx explainer on ONNX Runtime (lrp-onnx export-triton)."""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

TARGET = "target"  # int64 [N]; -1 explains the predicted class


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds, errors = [], {}
        for index, request in enumerate(requests):
            try:
                feeds.append(self._feed(request))
            except ValueError as e:
                errors[index] = str(e)
                feeds.append(None)
        results = self._run([f for f in feeds if f is not None])
        responses = []
        for index, feed in enumerate(feeds):
            if feed is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[index])))
                continue
            outputs = next(results)
            if isinstance(outputs, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(outputs))))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, outputs)]))
        return responses

    def _feed(self, request):
        feed = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feed[name] = tensor.as_numpy()
        missing = [n for n in self.inputs if n not in feed and n != TARGET]
        if missing:
            raise ValueError(f"missing input(s) {missing}")
        if TARGET not in feed:
            rows = len(next(iter(feed.values())))
            feed[TARGET] = np.full(rows, -1, dtype=np.int64)
        return feed

    def _run(self, feeds):
        """Each feed's outputs, in order: one session run for every feed when all have the same
        shapes past the batch axis, else one run per feed. A failed run yields its exception."""
        shapes = {tuple((n, v.shape[1:]) for n, v in f.items()) for f in feeds}
        if len(feeds) > 1 and len(shapes) == 1:
            batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
            try:
                outputs = self.session.run(self.outputs, batch)
            except Exception as e:
                yield from (e for _ in feeds)
                return
            ends = np.cumsum([len(f[self.inputs[0]]) for f in feeds])
            for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
                yield [o[start:end] for o in outputs]
            return
        for feed in feeds:
            try:
                yield self.session.run(self.outputs, feed)
            except Exception as e:
                yield e
'''


def export_triton(explainer, repo, name=None, max_batch_size=8, backend="onnxruntime", force=False):
    """Write the Triton model ``REPO/NAME`` for ``explainer`` (a path or ModelProto); returns the
    written files. Built in a hidden folder inside REPO and renamed into place, so a failure leaves
    no partial model; an existing ``REPO/NAME`` is replaced only with ``force``."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InputError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    proto, label = read_model(explainer)
    if not is_explainer(proto):
        raise InputError(f"{label}: not an explainer graph; convert it first (lrp-onnx convert)")
    name = name or _default_name(explainer)
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(
            f"model name {name!r}: use letters, digits, '_', '.' and '-' (not first), e.g. --name explainer"
        )
    config = config_text(proto, name, max_batch_size, backend, label)
    target = os.path.join(repo, name)
    if os.path.lexists(target) and not force:
        raise OutputError(f"{target!r} exists; pass --force to replace it")
    if os.path.lexists(target) and (os.path.islink(target) or not os.path.isdir(target)):
        raise OutputError(f"{target!r} is not a model folder; remove it first")
    writable_folder(repo)
    external = isinstance(explainer, (str, os.PathLike)) and bool(external_files(explainer))
    external = external or wants_external_data(proto)
    build = tempfile.mkdtemp(prefix=f".lrp-onnx-{name}-", dir=repo)
    try:
        os.chmod(build, 0o777 & ~_umask())  # mkdtemp makes the folder private; the user's umask decides
        os.mkdir(os.path.join(build, VERSION))
        save_model(proto, os.path.join(build, VERSION, MODEL_FILE), external_data=external)
        if backend == "python":
            atomic_write(os.path.join(build, VERSION, "model.py"), PYTHON_MODEL.encode())
        atomic_write(os.path.join(build, "config.pbtxt"), config.encode())
        if _have_tritonclient():
            validate_config(os.path.join(build, "config.pbtxt"), name=name)
        _replace(build, target)
    except OSError as e:
        raise OutputError(f"{target!r}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    files = ["config.pbtxt", f"{VERSION}/{MODEL_FILE}"] + ([f"{VERSION}/{MODEL_FILE}{DATA_SUFFIX}"] if external else [])
    return [os.path.join(target, f) for f in files + ([f"{VERSION}/model.py"] if backend == "python" else [])]


def _default_name(explainer):
    if not isinstance(explainer, (str, os.PathLike)):
        raise InputError("an explainer given as a ModelProto needs a model name")
    base = os.path.basename(os.fspath(explainer))
    for suffix in (".onnx", ".lrp"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    return base


def _replace(build, target):
    """Rename ``build`` to ``target``; an existing target is moved aside first and removed only
    once the new folder is in place (put back if the rename fails)."""
    if not os.path.exists(target):
        os.rename(build, target)
        return
    old = tempfile.mkdtemp(prefix=".lrp-onnx-old-", dir=os.path.dirname(os.path.abspath(target)))
    aside = os.path.join(old, "model")
    os.rename(target, aside)
    try:
        os.rename(build, target)
    except OSError:
        os.rename(aside, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def tensor_entries(proto, label="model"):
    """(inputs, outputs) of ``proto`` (named ``label`` in errors) as Triton sees them: dicts with
    name, data_type, dims (no batch axis; -1 where dynamic) and reshape (None, or [] for a
    per-sample scalar)."""

    def entry(value):
        where = f"{label}: {value.name!r}"
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise InputError(f"{where} is a {kind or 'typeless value'}; Triton takes tensors only")
        tensor = value.type.tensor_type
        if tensor.elem_type not in DATA_TYPES:
            raise InputError(
                f"{where} has ONNX type {TensorProto.DataType.Name(tensor.elem_type)}, which Triton "
                "has no data type for"
            )
        if not tensor.HasField("shape") or not tensor.shape.dim:
            raise InputError(
                f"{where} has no batch axis (unknown rank or a scalar); Triton's batching needs "
                "the first axis to be the batch"
            )
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        if dims[0] != -1:
            raise InputError(
                f"{where} has a fixed batch axis of {dims[0]}; re-export the classifier with a dynamic batch axis"
            )
        rest = dims[1:]
        return {
            "name": value.name,
            "data_type": DATA_TYPES[tensor.elem_type],
            "dims": rest or [1],
            "reshape": None if rest else [],
        }

    return [entry(v) for v in proto.graph.input], [entry(v) for v in proto.graph.output]


def config_text(proto, name, max_batch_size, backend, label="model"):
    """config.pbtxt for ``proto`` (protobuf text format of Triton's ModelConfig)."""
    inputs, outputs = tensor_entries(proto, label)
    engine = 'platform: "onnxruntime_onnx"' if backend == "onnxruntime" else 'backend: "python"'
    lines = [
        f'name: "{name}"',
        engine,
        f"max_batch_size: {max_batch_size}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}",
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
    ]
    for field, entries in (("input", inputs), ("output", outputs)):
        blocks = []
        for e in entries:
            dims = ", ".join(map(str, e["dims"]))
            body = [f'name: "{e["name"]}"', f"data_type: {e['data_type']}", f"dims: [ {dims} ]"]
            if e["reshape"] is not None:
                body.append("reshape: { shape: [ ] }")
            if field == "input" and e["name"] == TARGET and backend == "python":
                body.append("optional: true")
            blocks.append("  {\n" + "".join(f"    {line}\n" for line in body) + "  }")
        lines.append(f"{field} [\n" + ",\n".join(blocks) + "\n]")
    return "\n".join(lines) + "\n"


def _have_tritonclient():
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def validate_config(path, name=None):
    """Parse ``path`` (config.pbtxt) into Triton's ModelConfig message, and check what the schema
    cannot: the model name, and that every input and output matches the ONNX file in ``1/``
    (names, data types, dims, reshape) as Triton's ORT backend requires at load. Returns the
    ModelConfig; an InputError names the first problem. Needs tritonclient (``lrp-onnx[triton]``)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig
    except ImportError:
        raise InputError("validating config.pbtxt needs tritonclient: pip install 'lrp-onnx[triton]'") from None
    try:
        with open(path, encoding="utf-8") as f:
            config = text_format.Parse(f.read(), ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise InputError(f"{path}: not a valid Triton model config ({str(e).splitlines()[0]})") from None
    folder = os.path.dirname(os.path.abspath(path))
    name = name or os.path.basename(folder)
    if config.name != name:
        raise InputError(f"{path}: name {config.name!r} is not the model folder's {name!r}")
    if config.max_batch_size < 1:
        raise InputError(f"{path}: max_batch_size {config.max_batch_size}; an explainer's first axis is its batch")
    if (config.platform, config.backend) not in (("onnxruntime_onnx", ""), ("", "python"), ("", "onnxruntime")):
        raise InputError(
            f"{path}: platform {config.platform!r} / backend {config.backend!r} is not ONNX Runtime or Python"
        )
    try:
        model = onnx.load(os.path.join(folder, VERSION, MODEL_FILE), load_external_data=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read {VERSION}/{MODEL_FILE} beside it ({str(e).splitlines()[0]})") from None
    inputs, outputs = tensor_entries(model, os.path.join(folder, VERSION, MODEL_FILE))
    for field, written, expected in (("input", config.input, inputs), ("output", config.output, outputs)):
        found = [
            (t.name, DataType.Name(t.data_type), list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None)
            for t in written
        ]
        wanted = [(e["name"], e["data_type"], e["dims"], e["reshape"]) for e in expected]
        if sorted(found, key=str) != sorted(wanted, key=str):
            diff = sorted(set(map(str, found)) ^ set(map(str, wanted)))
            raise InputError(f"{path}: its {field}s do not match {VERSION}/{MODEL_FILE}: {'; '.join(diff)}")
    return config

"""Tensors whose bytes live outside the .onnx file ("external data"), and models past protobuf's 2 GB.

Reading: every external location is checked before a byte is read. It must name a regular file
inside the model's folder, reached without ``..``, an absolute path, a symlink or a NUL byte, with
one link only (a hardlink is a second name for a file that may sit anywhere), and its offset and
length must lie inside that file and match the tensor's dims. The bytes are read through the
descriptor that was checked, so the file cannot be swapped in between.

Large models: protobuf cannot serialise a message of 2 GB or more, yet the ONNX checker, the
version converter, shape inference and ONNX Runtime sessions all take serialised models. Steps
that serialise run on a *shell* of the model (``without_large_weights``); explainers that large
are saved, and run, with their weights in a data file beside the graph.

Held weights: while a model is converted its large initializers stay out of the ModelProto, in a
``HeldWeights`` (protobuf copies a tensor's bytes on every ``extend`` and ``CopyFrom``, and those
copies were most of a conversion's time and memory). They go into a proto once, at the end, or
straight from memory into the explainer's data file.
"""

import math
import os
import stat

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto

from .errors import ModelLoadError, UnsafeModelError, UnsupportedModelError

PROTOBUF_LIMIT = 2**31 - 1
# Tensors above this size leave the graph while a step serialises it, and go to the data file on save.
LARGE_TENSOR_BYTES = 1 << 20
DATA_SUFFIX = ".data"
PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)}


def model_tensors(proto):
    """Every TensorProto of a model: initializers, sparse initializers, node attributes, and those
    of every subgraph and function."""
    for graph in subgraphs(proto.graph):
        yield from graph_tensors(graph)
    for function in proto.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def subgraphs(graph):
    """``graph`` and its subgraphs, iteratively: a hostile file may nest them deeply."""
    pending = [graph]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    pending.append(attr.g)
                pending.extend(attr.graphs)


def graph_tensors(graph):
    """The TensorProtos of ``graph`` itself (not of its subgraphs)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices


def is_external(tensor):
    return tensor.data_location == TensorProto.EXTERNAL


def external_files(path):
    """The files, inside its folder, where the model file at ``path`` keeps tensor bytes (unchecked:
    for refusing to write over them; reading goes through ``load_external_data``)."""
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # an unreadable file is refused when it is loaded
        return []
    folder = os.path.dirname(os.path.abspath(path))
    locations = {
        e.value
        for t in model_tensors(proto)
        if is_external(t)
        for e in t.external_data
        if e.key == "location" and "\x00" not in e.value
    }
    return [os.path.join(folder, location) for location in sorted(locations)]


def tensor_nbytes(tensor, label):
    """Bytes that ``tensor``'s dims and data type call for; None for strings (no fixed size)."""
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{label}: tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
    count = math.prod(tensor.dims)
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_type in PACKED_4BIT:
        return (count + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        raise ModelLoadError(f"{label}: tensor {tensor.name!r} has unknown data type {tensor.data_type}") from None
    return count * itemsize


def check_tensor_sizes(proto, label):
    """Every tensor holds exactly the data its dims call for (a mismatch would make ONNX Runtime
    read past the buffer, or shape inference and folding disagree with the weights), and none is
    past protobuf's 2 GB limit on its own (UnsupportedModelError)."""
    for tensor in model_tensors(proto):
        if is_external(tensor):
            continue
        expected = tensor_nbytes(tensor, label)
        if tensor.HasField("raw_data"):
            held, unit = len(tensor.raw_data), "bytes"
        else:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type) if expected is not None else "string_data"
            held, unit = len(getattr(tensor, field)), "values"
            expected = _field_values(tensor.data_type, math.prod(tensor.dims))
        if held != expected:
            raise ModelLoadError(
                f"{label}: tensor {tensor.name!r} holds {held} {unit} but its dims "
                f"{list(tensor.dims)} call for {expected} (data length does not match dims)"
            )
        if unit == "bytes" and held > PROTOBUF_LIMIT:  # the graph travels in pieces, a tensor never does
            raise UnsupportedModelError(
                f"{label}: tensor {tensor.name!r} alone holds {held} bytes; a single "
                "tensor past protobuf's 2 GB limit is not supported"
            )


def is_large(tensor):
    """Raw data over LARGE_TENSOR_BYTES, judged by the dims (which ``check_tensor_sizes`` has matched
    to it): reading ``raw_data`` to measure it would copy the bytes. A held weight is large."""
    return is_held(tensor) or (
        tensor.HasField("raw_data") and (tensor_nbytes(tensor, tensor.name) or 0) > LARGE_TENSOR_BYTES
    )


def _field_values(data_type, count):
    """Values a typed field holds for ``count`` elements: complex numbers take two, 4-bit types half."""
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * count
    if data_type in PACKED_4BIT:
        return (count + 1) // 2
    return count


def load_external_data(proto, path, held=None):
    """Read every external tensor of ``proto``, loaded from ``path``, into the proto, after
    ``_read_external`` has checked where its bytes come from; not those that ``held`` holds."""
    label = os.fspath(path)
    folder = _folder(label)
    for tensor in model_tensors(proto):
        if not is_external(tensor) or (held is not None and held.holds(tensor)):
            continue
        tensor.raw_data = _read_external(tensor, folder, label)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def _folder(path):
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def _read_external(tensor, folder, label):
    entries = {e.key: e.value for e in tensor.external_data}
    where = f"{label}: tensor {tensor.name!r}"
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"{where} has external data without a location")
    if "\x00" in location:
        raise UnsafeModelError(f"{where}: external data location {location!r} holds a NUL byte")
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or location[:1] in "/\\" or (len(location) > 1 and location[1] == ":"):
        raise UnsafeModelError(
            f"{where}: external data location {location!r} is absolute; it must lie in the model's folder"
        )
    if ".." in parts:
        raise UnsafeModelError(f"{where}: external data location {location!r} leaves the model's folder")
    path = folder
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise UnsafeModelError(f"{where}: external data location {location!r} goes through a symlink")
    try:
        offset, length = (int(entries[k]) if k in entries else None for k in ("offset", "length"))
    except ValueError:
        raise ModelLoadError(f"{where}: external data offset or length is not an integer") from None
    try:  # non-blocking: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: external data file {location!r} is missing") from None
    except OSError as e:
        raise UnsafeModelError(f"{where}: cannot open external data {location!r} ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device: nothing to read weights from
        os.close(fd)
        raise UnsafeModelError(f"{where}: external data {location!r} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_nlink > 1:
            raise UnsafeModelError(
                f"{where}: external data {location!r} has {info.st_nlink} hard links; a "
                "hardlink may be a file from outside the model's folder"
            )
        offset = offset or 0
        length = info.st_size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > info.st_size:
            raise UnsafeModelError(
                f"{where}: external data offset {offset} and length {length} fall outside "
                f"{location!r} ({info.st_size} bytes)"
            )
        expected = tensor_nbytes(tensor, label)
        if expected is not None and length != expected:
            raise ModelLoadError(
                f"{where}: external data holds {length} bytes but dims {list(tensor.dims)} call "
                f"for {expected} (data length does not match dims)"
            )
        f.seek(offset)
        return f.read(length)


def require_loaded(proto, label, held=None):
    """A model given as bytes or a ModelProto has no folder to read external data from (the
    references of ``held`` aside)."""
    stray = next((t for t in model_tensors(proto) if is_external(t) and not (held is not None and held.holds(t))), None)
    if stray is not None:
        raise ModelLoadError(
            f"{label}: tensor {stray.name!r} keeps its data in an external file; pass the "
            "model's path so that the file can be found and checked"
        )


# A held weight's location: NUL cannot be in a real one (``_read_external`` refuses it), so no file
# can pass for held bytes.
HELD_LOCATION = "\x00held/"
# Element types held as they are. The others (float16 and bfloat16 ones, which the converter
# upcasts, 4-bit, strings) stay in the proto.
HELD_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.INT8,
    TensorProto.INT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.UINT8,
    TensorProto.UINT16,
    TensorProto.UINT32,
    TensorProto.UINT64,
}


def is_held(tensor):
    return is_external(tensor) and any(
        e.key == "location" and e.value.startswith(HELD_LOCATION) for e in tensor.external_data
    )


class HeldWeights:
    """The bytes of a model's large initializers, kept out of its ModelProto while it is
    converted. In the proto each is an external-data tensor at HELD_LOCATION + a number;
    the graph that is built reads them as read-only numpy arrays over the same bytes."""

    def __init__(self):
        self._data = {}  # location -> bytes
        self._arrays = {}  # location -> the array over them, once asked for

    @property
    def nbytes(self):
        return sum(map(len, self._data.values()))

    def hold(self, tensor, data):
        """The reference that stands for ``tensor`` (its name, type and dims) in the proto, its
        bytes ``data`` kept here."""
        location = f"{HELD_LOCATION}{len(self._data)}"
        self._data[location] = data
        return self._reference(tensor, location)

    @staticmethod
    def _reference(tensor, location):
        reference = TensorProto()
        _copy_fields(tensor, reference, skip=("raw_data", "external_data", "data_location"))
        reference.data_location = TensorProto.EXTERNAL
        reference.external_data.add(key="location", value=location)
        return reference

    @staticmethod
    def takes(dtype, shape):
        """Whether a constant of numpy ``dtype`` and ``shape`` is held: one of HELD_TYPES, over
        LARGE_TENSOR_BYTES."""
        if dtype is None or shape is None or np.dtype(dtype).kind not in "biuf":
            return False
        dtype = np.dtype(dtype)
        return (
            onnx.helper.np_dtype_to_tensor_dtype(dtype) in HELD_TYPES
            and math.prod(shape) * dtype.itemsize > LARGE_TENSOR_BYTES
        )

    def hold_array(self, name, array):
        """A reference for a graph constant ``name`` with values ``array``: an array of
        ``array_of`` is held already, under its own location, so its bytes are not copied."""
        location = next((at for at, held in self._arrays.items() if held is array), None)
        header = _tensor_header(name, array)
        if location is None:
            return self.hold(header, np.ascontiguousarray(array).tobytes())
        return self._reference(header, location)

    def array_of(self, tensor):
        """The held bytes of reference ``tensor`` as a read-only array of its type and dims."""
        location = _location(tensor)
        if location not in self._arrays:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            self._arrays[location] = np.frombuffer(self._data[location], dtype).reshape(tuple(tensor.dims))
        return self._arrays[location]

    def data_of(self, tensor):
        return self._data[_location(tensor)]

    def holds(self, tensor):
        """Whether ``tensor`` is a reference to bytes held here."""
        return is_external(tensor) and _location(tensor) in self._data

    def restored(self, proto):
        """``proto`` with the held bytes back in its main graph's references (changed in place)."""
        for tensor in proto.graph.initializer:
            if self.holds(tensor):
                tensor.raw_data = self.data_of(tensor)
                del tensor.external_data[:]
                tensor.ClearField("data_location")
        return proto


def _location(tensor):
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _tensor_header(name, array):
    """A TensorProto naming ``array``'s type and dims, without its values."""
    return TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)


def holding_large_weights(proto, held, path=None):
    """A copy of ``proto`` whose main-graph initializers over LARGE_TENSOR_BYTES, of HELD_TYPES,
    are held in ``held``: an external one is read (after the checks of ``_read_external``, with
    ``path`` the model's file) straight into it, an inline one copied out of the proto once.
    ``proto`` is left as it was. A tensor whose data does not match its dims stays in the copy,
    for ``check_tensor_sizes`` to refuse."""
    label = os.fspath(path) if path is not None else "<model>"
    shell = onnx.ModelProto()
    _copy_fields(proto, shell, skip=("graph",))
    _copy_fields(proto.graph, shell.graph, skip=("initializer",))
    for tensor in proto.graph.initializer:
        data = _data_to_hold(tensor, path, label)
        shell.graph.initializer.append(tensor if data is None else held.hold(tensor, data))
    return shell


def _data_to_hold(tensor, path, label):
    """The bytes of ``tensor`` if it is to be held, else None."""
    if (
        tensor.data_type not in HELD_TYPES
        or tensor.HasField("segment")
        or (tensor_nbytes(tensor, label) or 0) <= LARGE_TENSOR_BYTES
    ):
        return None
    if is_external(tensor):
        return _read_external(tensor, _folder(path), label) if path is not None else None
    data = tensor.raw_data if tensor.HasField("raw_data") else None
    return data if data is not None and len(data) == tensor_nbytes(tensor, label) else None


# Explainers past this size are saved with external data by default: ONNX Runtime Web (WASM) failed
# with std::bad_alloc on a 515 MB single-file explainer and ran it with external data.
EXTERNAL_DATA_THRESHOLD = 256 << 20


def wants_external_data(proto, held=None):
    """Whether ``proto`` is saved with its large weights beside it by default: past
    EXTERNAL_DATA_THRESHOLD bytes, or too large to serialise at all. ``held``: the HeldWeights of
    a proto from ``convert_held``, whose bytes count too."""
    try:
        size = proto.ByteSize()  # which serialises to measure, and so fails past protobuf's limit
    except EncodeError:
        return True
    return size + (held.nbytes if held is not None else 0) > EXTERNAL_DATA_THRESHOLD


def without_large_weights(step, proto):
    """``step(shell)`` where the shell is ``proto`` with its large initializers turned into typed
    graph inputs, then those initializers put back. For steps that serialise the model (the
    checker, the version converter, shape inference): they then cost no copy of the weights, and
    a model past protobuf's 2 GB limit passes them too. The step's result may be a new proto, or None."""
    graph = proto.graph
    large = [t for t in graph.initializer if is_large(t)]
    if not large:
        return step(proto)
    names = {t.name for t in large}
    # field by field, so that neither the shell nor the model copies a weight: a repeated field of
    # messages copies every message it is extended with
    shell = onnx.ModelProto()
    _copy_fields(proto, shell, skip=("graph",))
    _copy_fields(graph, shell.graph, skip=("initializer",))
    shell.graph.initializer.extend(t for t in graph.initializer if t.name not in names)
    listed = {i.name for i in graph.input}  # IR 3 files list initializers as inputs already
    added = {t.name for t in large if t.name not in listed}
    shell.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in large if t.name in added
    )
    result = step(shell)
    if result is None:
        return proto
    inputs = [i for i in result.graph.input if i.name not in added]
    result.graph.ClearField("input")
    result.graph.input.extend(inputs)
    result.graph.initializer.extend(large)
    return result


def _copy_fields(source, target, skip):
    """Every field set in ``source`` but those named in ``skip``, copied into the empty message
    ``target``. Field by field, not ListFields: that would copy the bytes of a skipped ``raw_data``."""
    for field in source.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if is_repeated(field):
            getattr(target, field.name).extend(getattr(source, field.name))
        elif source.HasField(field.name):
            if field.type == field.TYPE_MESSAGE:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def is_repeated(field):
    """Whether protobuf ``field`` is repeated. Protobuf 7 dropped FieldDescriptor.label for
    is_repeated, which older releases lack (6.x has both, and warns on every read of label)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def save_with_external_data(proto, path, write, held=None):
    """Write ``proto`` as ``path`` plus ``path + DATA_SUFFIX``, holding every initializer over
    LARGE_TENSOR_BYTES (aligned to 4 KiB, so a runtime may map it); the bytes of ``held``'s
    references are written from there. ``write(path, data)`` (``files.atomic_write``) writes
    each file; the data file goes first, so the graph never names bytes that are missing.
    ``proto`` is left as it was."""
    data_path = path + DATA_SUFFIX
    chunks, offset, moved = [], 0, []  # moved: (tensor, its bytes or its held location before)
    for tensor in (t for t in proto.graph.initializer if is_large(t)):
        padding = -offset % 4096
        chunks.append(b"\0" * padding)
        offset += padding
        if is_held(tensor):
            data, before = held.data_of(tensor), _location(tensor)
        else:
            data = before = tensor.raw_data
            tensor.ClearField("raw_data")
        chunks.append(data)
        moved.append((tensor, before))
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in {
            "location": os.path.basename(data_path),
            "offset": str(offset),
            "length": str(len(data)),
        }.items():
            tensor.external_data.add(key=key, value=value)
        offset += len(data)
    try:
        write(data_path, chunks)
        write(path, proto.SerializeToString())
    finally:
        for tensor, before in moved:
            del tensor.external_data[:]
            if isinstance(before, str):
                tensor.external_data.add(key="location", value=before)
            else:
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = before

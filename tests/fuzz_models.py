"""Fuzzing harness of the loader (issue 7): seed models, hypothesis strategies that mutate them,
a persistent worker subprocess that converts each mutated file, and the classification of what
happened. Shared by tests/test_fuzz_loader.py and benchmarks/fuzz_loader.py.

The contract: ``lrp_onnx.convert(path)`` (and saving its result) succeeds or raises a subclass of
``LrpOnnxError``. A failure is anything else: an untyped exception, a crash (the worker dies of a
signal or exits), a hang (no answer within the timeout), or a file read outside the model's folder.

Mutation families, each a hypothesis strategy of ``Case``:
- bytes: bit flips, byte writes, inserts, deletes, truncations (down to 0 bytes), duplications and
  overlong varints in the serialised file;
- proto-field: ir_version, opsets, tensor dims/data types/raw_data, op types, attributes, empty or
  input-less graphs, duplicate names, value_info, recursive local functions, strings that are not UTF-8;
- external-data: location (attack paths and junk), offset, length, checksum, unknown and
  duplicate keys, data_location, and the data file itself (truncated, empty, missing, a
  directory, a symlink or hardlink to the secret).
Explicit cases (``explicit_cases``): each attack of ``ATTACKS``, If and Loop bodies nested to
``NESTING_DEPTHS``, and a data file that is a FIFO or a directory.

How reads outside the model's folder are detected: ``DETECTION`` (also written to RELIABILITY.md).
"""

import contextlib
import ctypes
import dataclasses
import faulthandler
import functools
import json
import os
import pathlib
import re
import resource
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections import Counter

import numpy as np
import onnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CNN = os.path.join(ROOT, "models", "digits_cnn.onnx")

SECRET_WORD = b"SCRT"  # float32 3.6e12: positive, so the alpha-beta split keeps it as it is
SECRET = SECRET_WORD * 4096  # 16 KiB: more than any seed tensor needs
LEAK_SIGNATURE = SECRET_WORD * 4
MARKER_FOLDER = "/nonexistent-lrp-fuzz-marker"  # opened (and failing) around each case, seen by strace
WORKER_MEMORY = 8 << 30  # address space: a huge allocation fails in the worker instead of exhausting the machine
INT64_MAX, INT64_MIN = 2**63 - 1, -2**63
FAILURE_STATUSES = ("untyped", "crash", "hang")


DETECTION = """\
- **strace**, where it runs: the worker runs under `strace -f -y`, which logs, for every thread,
  Python and C++ alike (ONNX, ONNX Runtime), each read, pread, readv, mmap, sendfile and
  copy_file_range that moved bytes, with the file its descriptor refers to (symlinks resolved).
  The worker opens a marker path before and after each case, so each read is attributed to its
  case. Reads count, not opens: a loader may open a file to check it (fstat) and refuse it unread.
- **Audit hook**, without strace: `sys.addaudithook`, installed after every import and a warm-up
  conversion, reports each Python-level open for reading. An open that reads nothing counts,
  reads from C++ go unseen, and hardlinks are left to the sentinel.
- **Sentinel**: the secret sits beside the model's folder (`../secret.bin`, and the absolute path
  the attacks name) and as a decoy `weights.bin` in the worker's working directory (a loader that
  resolved locations against the cwd would read it). Its bytes are a repeated positive float32,
  which survives weight splitting and transposition: a converted explainer must not hold them.
- A read counts as outside when its file is a secret (same device and inode, which catches a
  hardlink inside the folder; strace only), or when its real path lies outside the model's
  folder, the output folder and the system folders (the Python installation, site-packages, the
  repository, /usr, /lib, /etc, /proc, /sys, /dev/null, /dev/urandom).
- Not covered: io_uring and splice, reads by another process through a descriptor passed to it,
  and system folders (a symlink to /etc/passwd inside the model's folder is refused by the
  loader, but a read of it would not be flagged)."""


def _real_roots(paths):
    return tuple(sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)}))


SYSTEM_ROOTS = _real_roots([sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), ROOT,
                            "/usr", "/lib", "/lib64", "/etc", "/proc", "/sys"])
SYSTEM_FILES = ("/dev/null", "/dev/urandom", "/dev/random")


def is_under(path, roots):
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


# ---------------------------------------------------------------------------------------- seeds

def conv_classifier():
    """Conv → Relu → Flatten → Gemm, 1×8×8 input, 10 classes, opset 13."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (4, 1, 3, 3)), ("B", (4,)), ("G", (10, 144)), ("C", (10,)))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["conv"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flatten", axis=1),
             helper.make_node("Gemm", ["flat", "G", "C"], ["y"], name="dense", transB=1)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def matmul_classifier():
    """MatMul → Add → Relu → MatMul, 16 features, 5 classes, opset 17."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (16, 8)), ("b1", (8,)), ("W2", (8, 5)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


EXTERNAL_SEED = "conv-external"
DATA_FILE = "weights.bin"


@functools.cache
def seed_files(name):
    """The files of seed ``name``: ``model.onnx`` and, for the external-data seed, ``weights.bin``."""
    if name == "digits_cnn":
        return {"model.onnx": pathlib.Path(DIGITS_CNN).read_bytes()}
    proto = matmul_classifier() if name == "matmul" else conv_classifier()
    if name != EXTERNAL_SEED:
        return {"model.onnx": proto.SerializeToString()}
    with tempfile.TemporaryDirectory() as folder:
        onnx.save_model(proto, os.path.join(folder, "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=0)
        return {file: pathlib.Path(folder, file).read_bytes() for file in ("model.onnx", DATA_FILE)}


SEEDS = ("conv", "matmul", "digits_cnn", EXTERNAL_SEED)
INLINE_SEEDS = ("conv", "matmul", "digits_cnn")


# ----------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """Files for the model's folder: ``files`` by name (``model.onnx`` is the model) and ``specials``
    by name: "symlink-to-secret", "hardlink-to-secret", "fifo" or "directory"."""
    kind: str
    description: str
    files: dict
    specials: dict = dataclasses.field(default_factory=dict)


class Draft:
    """A seed being mutated: its proto, its other files, and a note per mutation (the reproducer)."""

    def __init__(self, seed, secret_path=None):
        self.seed, self.secret_path = seed, secret_path
        self.files = dict(seed_files(seed))
        self.proto = onnx.ModelProto.FromString(self.files["model.onnx"])
        self.specials = {}
        self.notes = []
        self.invalid_utf8 = False  # whether NOT_UTF8's placeholder is to be replaced in the file

    def case(self, kind):
        data = self.proto.SerializeToString()
        if self.invalid_utf8:
            data = data.replace(*NOT_UTF8)
        return Case(kind, f"{self.seed}: {'; '.join(self.notes)}", {**self.files, "model.onnx": data},
                    dict(self.specials))


def _position(draw, data, end=False):
    return draw(st.integers(0, len(data) if end else max(len(data) - 1, 0)))


def _flip_bit(data, draw):
    if not data:
        return "flip on an empty file (no-op)"
    at, bit = _position(draw, data), draw(st.integers(0, 7))
    data[at] ^= 1 << bit
    return f"flip bit {bit} at byte {at}"


def _write_byte(data, draw):
    if not data:
        return "write on an empty file (no-op)"
    at, value = _position(draw, data), draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x08, 0x0A, 0x12, 0x3A]))
    data[at] = value
    return f"byte {at} = {value:#04x}"


def _insert(data, draw):
    at, chunk = _position(draw, data, end=True), draw(st.binary(min_size=1, max_size=16))
    data[at:at] = chunk
    return f"insert {chunk!r} at {at}"


def _delete(data, draw):
    at, count = _position(draw, data), draw(st.integers(1, 64))
    del data[at:at + count]
    return f"delete {count} bytes at {at}"


def _truncate(data, draw):
    at = draw(st.one_of(st.just(0), st.integers(0, len(data))))
    del data[at:]
    return f"truncate to {at} bytes"


def _duplicate(data, draw):
    at, count = _position(draw, data), draw(st.integers(1, 256))
    data[at:at] = data[at:at + count]
    return f"duplicate {count} bytes at {at}"


def _overlong_varint(data, draw):
    """Ten continuation bytes: a varint longer than protobuf allows, or a length past the file's end."""
    at = _position(draw, data, end=True)
    data[at:at] = b"\xff" * 10
    return f"insert 10 × 0xff at {at}"


BYTE_MUTATIONS = (_flip_bit, _write_byte, _insert, _delete, _truncate, _duplicate, _overlong_varint)


@st.composite
def byte_cases(draw):
    """A seed file (the external-data seed's model.onnx too, its weights.bin intact) with 1-6 byte edits."""
    draft = Draft(draw(st.sampled_from(SEEDS)))
    data = bytearray(draft.files["model.onnx"])
    for mutation in draw(st.lists(st.sampled_from(BYTE_MUTATIONS), min_size=1, max_size=6)):
        draft.notes.append(mutation(data, draw))
    return Case("bytes", f"{draft.seed}: {'; '.join(draft.notes)}", {**draft.files, "model.onnx": bytes(data)})


HUGE_INTS = (-1, 0, 1, 2**31, 2**40, 2**62, INT64_MAX, INT64_MIN)
JUNK_NAMES = st.sampled_from(["", "Conv ", "conv", "NotAnOp", "If", "Loop", "Scan", "Constant", "\x00", "é" * 40,
                              "../x", "a" * 1000])


def _pick(draw, items):
    return items[draw(st.integers(0, len(items) - 1))] if len(items) else None


def _ir_version(draft, draw):
    draft.proto.ir_version = value = draw(st.sampled_from([0, -1, 1, 2, 3, 7, 11, 12, 100, 2**31, INT64_MAX]))
    return f"ir_version = {value}"


def _opset(draft, draw):
    imports = draft.proto.opset_import
    choice = draw(st.sampled_from(["version", "junk domain", "duplicate", "none"]))
    if choice == "none":
        del imports[:]
        return "no opset_import"
    value = draw(st.sampled_from([0, -1, 1, 6, 9, 12, 13, 16, 22, 23, 24, 1000, INT64_MAX]))
    if choice == "version":
        (imports[0] if imports else imports.add(domain="")).version = value
        return f"opset version = {value}"
    domain = "" if choice == "duplicate" else draw(JUNK_NAMES)
    imports.add(domain=domain, version=value)
    return f"extra opset_import {domain!r} version {value}"


def _tensor_dims(draft, draw):
    tensor = _pick(draw, draft.proto.graph.initializer)
    value = draw(st.sampled_from(HUGE_INTS))
    if draw(st.booleans()) or not tensor.dims:
        tensor.dims.append(value)
        return f"initializer {tensor.name!r}: append dim {value}"
    at = draw(st.integers(0, len(tensor.dims) - 1))
    tensor.dims[at] = value
    return f"initializer {tensor.name!r}: dims[{at}] = {value}"


def _tensor_overflowing_dims(draft, draw):
    """Dims whose product overflows int64 while each fits."""
    tensor = _pick(draw, draft.proto.graph.initializer)
    dims = draw(st.sampled_from([[2**32, 2**32], [2**62, 4], [INT64_MAX, INT64_MAX], [-2**32, -2**32]]))
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return f"initializer {tensor.name!r}: dims = {dims}"


def _tensor_data_type(draft, draw):
    tensor = _pick(draw, draft.proto.graph.initializer)
    tensor.data_type = value = draw(st.sampled_from([0, -1, 7, 8, 10, 16, 17, 21, 22, 23, 99, 2**31 - 1]))
    return f"initializer {tensor.name!r}: data_type = {value}"


def _tensor_data(draft, draw):
    tensor = _pick(draw, draft.proto.graph.initializer)  # every seed tensor keeps its values in raw_data
    choice = draw(st.sampled_from(["shorter", "longer", "empty", "float_data too", "odd length"]))
    raw = tensor.raw_data
    tensor.raw_data = {"shorter": raw[:len(raw) // 2], "longer": raw + raw[:64], "empty": b"",
                       "float_data too": raw, "odd length": raw[:-1]}[choice]
    if choice == "float_data too":
        tensor.float_data.extend([1.0, 2.0])
    return f"initializer {tensor.name!r}: raw_data {choice}"


def _op_type(draft, draw):
    node = _pick(draw, draft.proto.graph.node)
    if draw(st.booleans()):
        node.op_type = value = draw(JUNK_NAMES)
        return f"node {node.name!r}: op_type = {value!r}"
    node.domain = value = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "junk", "ai.onnx.preview.training"]))
    return f"node {node.name!r}: domain = {value!r}"


def _attribute(draft, draw):
    """An attribute of a wrong type, a junk value, an invalid type tag, or a duplicate."""
    node = _pick(draw, draft.proto.graph.node)
    name = draw(st.sampled_from(["kernel_shape", "strides", "pads", "dilations", "group", "axis", "transA",
                                 "transB", "alpha", "auto_pad", "perm", "junk"]))
    value = draw(st.sampled_from([[0], [-1], [2**40], [0, 0], [-5, -5, -5, -5], 0, -1, 2**31, 2**62, float("nan"),
                                  float("inf"), "SAME_UPPER", "junk", b"\xff"]))
    kept = [a for a in node.attribute if a.name != name]
    attr = helper.make_attribute(name, value)
    if draw(st.booleans()):
        attr.type = draw(st.sampled_from([0, 5, 13]))  # UNDEFINED, TENSOR, SPARSE_TENSOR: not the value's type
    del node.attribute[:]
    node.attribute.extend(kept + [attr] * draw(st.integers(1, 2)))
    return f"node {node.name!r}: attribute {name} = {value!r}, type tag {attr.type}"


def _empty_graph(draft, draw):
    what = draw(st.sampled_from(["node", "initializer", "input", "output", "everything"]))
    fields = ["node", "initializer", "input", "output"] if what == "everything" else [what]
    for field in fields:
        draft.proto.graph.ClearField(field)
    return f"graph without {what}"


def _dangling(draft, draw):
    node = _pick(draw, draft.proto.graph.node)
    if draw(st.booleans()) or not node.input:
        node.output[0] = draw(st.sampled_from(["", "x", "ghost"]))
        return f"node {node.name!r}: output[0] = {node.output[0]!r}"
    node.input[draw(st.integers(0, len(node.input) - 1))] = value = draw(st.sampled_from(["", "ghost", "y"]))
    return f"node {node.name!r}: an input renamed {value!r}"


def _duplicate_names(draft, draw):
    graph = draft.proto.graph
    what = draw(st.sampled_from(["initializer", "input", "output", "node", "node output"]))
    if what == "node output":
        first, second = graph.node[0], _pick(draw, graph.node)
        second.output[0] = first.output[0]
        return f"node {second.name!r} writes {first.output[0]!r} too"
    items = getattr(graph, what)
    item = _pick(draw, items)
    if item is None:
        return f"no {what} to duplicate (no-op)"
    items.add().CopyFrom(item)
    if what == "initializer":
        items[-1].dims.append(1)  # same name, another shape
    return f"{what} {item.name!r} twice"


def _value_info(draft, draw):
    """Junk types on a graph input, output or intermediate tensor."""
    graph = draft.proto.graph
    target = draw(st.sampled_from(["input", "output", "value_info"]))
    if target == "value_info":
        info = graph.value_info.add(name=_pick(draw, graph.node).output[0])
    else:
        info = _pick(draw, getattr(graph, target))
        if info is None:
            return f"no {target} (no-op)"
    tensor_type = info.type.tensor_type
    choice = draw(st.sampled_from(["elem_type", "dims", "no type", "rank 0", "dim_param"]))
    if choice == "elem_type":
        tensor_type.elem_type = value = draw(st.sampled_from([0, -1, 7, 8, 9, 99]))
    elif choice == "dims":
        value = draw(st.lists(st.sampled_from(HUGE_INTS), min_size=1, max_size=5))
        tensor_type.shape.ClearField("dim")
        for d in value:
            tensor_type.shape.dim.add(dim_value=d)
    elif choice == "no type":
        info.ClearField("type")
        value = ""
    elif choice == "rank 0":
        tensor_type.shape.ClearField("dim")
        value = "[]"
    else:
        value = draw(JUNK_NAMES)
        for dim in tensor_type.shape.dim:
            dim.dim_param = value
    return f"{target} {info.name!r}: {choice} {value!r}"


def _node_order(draft, draw):
    nodes = list(draft.proto.graph.node)
    del draft.proto.graph.node[:]
    draft.proto.graph.node.extend(nodes[::-1])
    return "nodes in reverse order"


def _recursive_function(draft, draw):
    """A model-local function that calls itself, replacing a node: inlining or checking it never ends."""
    node = _pick(draw, draft.proto.graph.node)
    function = helper.make_function("local", "Loopy", ["a"], ["b"],
                                    [helper.make_node("Loopy", ["a"], ["b"], domain="local")],
                                    [helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])
    draft.proto.functions.append(function)
    draft.proto.opset_import.add(domain="local", version=1)
    node.op_type, node.domain = "Loopy", "local"
    del node.input[1:]
    del node.attribute[:]
    return f"node {node.name!r} calls the recursive local function Loopy"


# A placeholder string, and the bytes of the same length (so every length prefix still holds) that
# replace it in the serialised file: protobuf's Python API cannot set a string that is not UTF-8.
NOT_UTF8 = (b"NOTUTF8", b"NOT\xff\xfeF8")


NOT_UTF8_FIELDS = ("node name", "op_type", "node domain", "input name", "dim_param", "initializer name",
                   "producer_name", "graph doc_string")


def _invalid_utf8(draft, draw):
    """A name or string field whose bytes are not UTF-8."""
    graph = draft.proto.graph
    return _place_invalid_utf8(draft, draw(st.sampled_from(NOT_UTF8_FIELDS)), _pick(draw, graph.node),
                               _pick(draw, graph.initializer))


def invalid_utf8_case(field):
    """The conv seed with ``field`` (of its first node, input or initializer) not UTF-8."""
    draft = Draft("conv")
    graph = draft.proto.graph
    draft.notes.append(_place_invalid_utf8(draft, field, graph.node[0], graph.initializer[0]))
    return draft.case("proto-field")


def _place_invalid_utf8(draft, field, node, tensor):
    proto, graph, placeholder = draft.proto, draft.proto.graph, NOT_UTF8[0].decode()
    if field in ("input name", "dim_param") and not graph.input:
        field = "node name"
    if field == "node name":
        node.name = placeholder
    elif field == "op_type":
        node.op_type = placeholder
    elif field == "node domain":
        node.domain = placeholder
    elif field == "input name":  # renamed where it is read too: the name is the only fault
        for reader in graph.node:
            reader.input[:] = [placeholder if name == graph.input[0].name else name for name in reader.input]
        graph.input[0].name = placeholder
    elif field == "dim_param":
        dims = graph.input[0].type.tensor_type.shape.dim
        (dims[0] if dims else dims.add()).dim_param = placeholder
    elif field == "initializer name":
        tensor.name = placeholder
    elif field == "producer_name":
        proto.producer_name = placeholder
    else:
        graph.doc_string = placeholder
    draft.invalid_utf8 = True
    return f"{field} = {NOT_UTF8[1]!r}"


FIELD_MUTATIONS = (_ir_version, _opset, _tensor_dims, _tensor_overflowing_dims, _tensor_data_type, _tensor_data,
                   _op_type, _attribute, _empty_graph, _dangling, _duplicate_names, _value_info, _node_order,
                   _recursive_function, _invalid_utf8)


@st.composite
def proto_field_cases(draw):
    """An inline seed with 1-3 field mutations (applied in turn: later ones see the earlier ones)."""
    draft = Draft(draw(st.sampled_from(INLINE_SEEDS)))
    for mutation in draw(st.lists(st.sampled_from(FIELD_MUTATIONS), min_size=1, max_size=3)):
        if not draft.proto.graph.node or not draft.proto.graph.initializer:
            break  # an earlier mutation emptied the graph: the later ones have nothing to edit
        draft.notes.append(mutation(draft, draw))
    return draft.case("proto-field")


def _entries(tensor):
    return {e.key: e.value for e in tensor.external_data}


def _set_entry(tensor, key, value):
    """Set ``key`` (the first entry of that key, or a new one)."""
    entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add(key=key)
    entry.value = value


# Attacks on one tensor of the external-data seed: each points its location (or its offset and
# length) at bytes outside the model's folder or past a file's end. Each takes the draft and the tensor.

def _attack_parent(draft, tensor):
    _set_entry(tensor, "location", "../secret.bin")


def _attack_absolute(draft, tensor):
    _set_entry(tensor, "location", draft.secret_path)


def _attack_symlink(draft, tensor):
    draft.specials["link.bin"] = "symlink-to-secret"
    _set_entry(tensor, "location", "link.bin")


def _attack_hardlink(draft, tensor):
    draft.specials["hard.bin"] = "hardlink-to-secret"
    _set_entry(tensor, "location", "hard.bin")


def _attack_nul(draft, tensor):
    _set_entry(tensor, "location", f"{DATA_FILE}\x00../secret.bin")


def _attack_offset_past_end(draft, tensor):
    _set_entry(tensor, "offset", str(len(seed_files(EXTERNAL_SEED)[DATA_FILE]) + 16))


def _attack_length_past_end(draft, tensor):
    _set_entry(tensor, "length", str(len(seed_files(EXTERNAL_SEED)[DATA_FILE]) + 4096))


ATTACKS = {"parent": _attack_parent, "absolute": _attack_absolute, "symlink": _attack_symlink,
           "hardlink": _attack_hardlink, "nul": _attack_nul, "offset-past-end": _attack_offset_past_end,
           "length-past-end": _attack_length_past_end}
ATTACKS_ON_LOCATION = ("parent", "absolute", "symlink", "hardlink", "nul")


def attack_case(attack, secret_path, tensor_name="G"):
    """The external-data seed with ``attack`` on one tensor. Location attacks keep the tensor's
    offset 0 and length: the secret has enough bytes, so a loader that follows the location reads it."""
    draft = Draft(EXTERNAL_SEED, secret_path)
    tensor = next(t for t in draft.proto.graph.initializer if t.name == tensor_name)
    if attack in ATTACKS_ON_LOCATION:
        _set_entry(tensor, "offset", "0")
    ATTACKS[attack](draft, tensor)
    draft.notes.append(f"tensor {tensor_name!r}: {attack} attack, entries {_entries(tensor)!r}")
    return draft.case("attack")


NUMBERS = st.sampled_from(["-1", "0", "1", "4", "144", "5920", "5921", str(INT64_MAX), str(2**64), "", "abc", "1e3",
                           " 12", "0x10", "12\x00", "-0"])
JUNK_LOCATIONS = ["", ".", "/", "sub", "missing.bin", "model.onnx", f"./{DATA_FILE}", f"{DATA_FILE}/",
                  f"sub/../{DATA_FILE}", "sub/../../secret.bin", f"{DATA_FILE}/../../secret.bin", "..\\secret.bin",
                  "%2e%2e/secret.bin", "~/secret.bin", "a" * 300, f"{DATA_FILE} ", "é.bin",
                  "//secret.bin", "C:/secret.bin"]


def _external_location(draft, tensor, draw):
    location = draw(st.sampled_from(JUNK_LOCATIONS))
    if location == "sub" or location.startswith("sub/"):
        draft.specials["sub"] = "directory"
    _set_entry(tensor, "location", location)
    return f"location = {location!r}"


def _external_number(draft, tensor, draw):
    key, value = draw(st.sampled_from(["offset", "length"])), draw(NUMBERS)
    _set_entry(tensor, key, value)
    return f"{key} = {value!r}"


def _external_keys(draft, tensor, draw):
    """A checksum (never verified by ONNX), an unknown key, a duplicate location, or no entries."""
    choice = draw(st.sampled_from(["checksum", "unknown key", "second location", "no entries", "no location"]))
    if choice == "checksum":
        tensor.external_data.add(key="checksum", value=draw(st.sampled_from(["0" * 40, "junk", ""])))
    elif choice == "unknown key":
        tensor.external_data.add(key=draw(JUNK_NAMES), value="1")
    elif choice == "second location":
        tensor.external_data.add(key="location", value=draw(st.sampled_from(["../secret.bin", "missing.bin"])))
    else:  # no entries, or all but the location
        kept = [e for e in tensor.external_data if choice == "no location" and e.key != "location"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
    return choice


def _external_flag(draft, tensor, draw):
    """data_location DEFAULT on a tensor whose bytes are external, or EXTERNAL on an inline one."""
    if draw(st.booleans()):
        tensor.data_location = TensorProto.DEFAULT
        return "data_location = DEFAULT"
    inline = draft.proto.graph.initializer.add()
    inline.CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), "inline"))
    inline.data_location = TensorProto.EXTERNAL
    return "an inline tensor marked EXTERNAL"


def _external_file(draft, tensor, draw):
    """The data file itself: truncated, empty, missing, a directory, or a link to the secret. (A FIFO
    is an explicit case: each one that blocks costs a whole timeout.)"""
    choice = draw(st.sampled_from(["truncated", "empty", "missing", "directory", "symlink", "hardlink"]))
    data = draft.files.pop(DATA_FILE)
    if choice == "truncated":
        draft.files[DATA_FILE] = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif choice == "empty":
        draft.files[DATA_FILE] = b""
    elif choice == "directory":
        draft.specials[DATA_FILE] = choice
    elif choice in ("symlink", "hardlink"):
        draft.specials[DATA_FILE] = f"{choice}-to-secret"
    return f"{DATA_FILE} {choice}"


def _external_attack(draft, tensor, draw):
    attack = draw(st.sampled_from(sorted(ATTACKS)))
    ATTACKS[attack](draft, tensor)
    return f"{attack} attack"


EXTERNAL_MUTATIONS = (_external_location, _external_number, _external_keys, _external_flag, _external_file,
                      _external_attack)


@st.composite
def external_data_cases(draw, secret_path):
    """The external-data seed with 1-3 mutations of one tensor's entries or of the data file."""
    draft = Draft(EXTERNAL_SEED, secret_path)
    tensor = _pick(draw, draft.proto.graph.initializer)
    for mutation in draw(st.lists(st.sampled_from(EXTERNAL_MUTATIONS), min_size=1, max_size=3)):
        if mutation is _external_file and DATA_FILE not in draft.files:
            continue  # the data file is already gone or replaced
        draft.notes.append(f"tensor {tensor.name!r}: {mutation(draft, tensor, draw)}")
    return draft.case("external-data")


FAMILIES = ("bytes", "proto-field", "external-data")


def family_cases(family, secret_path):
    """The strategy of one mutation family (the external-data attacks name the secret's absolute path)."""
    if family == "external-data":
        return external_data_cases(secret_path)
    return byte_cases() if family == "bytes" else proto_field_cases()


def all_cases(secret_path):
    return st.one_of(*(family_cases(family, secret_path) for family in FAMILIES))


NESTING_DEPTHS = (24, 50, 100, 200)  # protobuf refuses more than 32 levels; 24 is within
NOT_REGULAR = ("fifo", "directory")


def not_regular_data_file_case(special):
    """The external-data seed whose data file is a FIFO or a directory."""
    files = {"model.onnx": seed_files(EXTERNAL_SEED)["model.onnx"]}
    return Case("special-file", f"{EXTERNAL_SEED}: {DATA_FILE} is a {special}", files, {DATA_FILE: special})


def explicit_cases(secret_path):
    """Every attack, nesting depth and non-regular data file, once."""
    return ([attack_case(attack, secret_path) for attack in sorted(ATTACKS)] +
            [nested_case(op, depth) for op in ("If", "Loop") for depth in NESTING_DEPTHS] +
            [not_regular_data_file_case(special) for special in NOT_REGULAR])


def _length_delimited(field_number, payload):
    """A protobuf wire-format field holding ``payload`` (a message)."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Field numbers in onnx.proto
MODEL_GRAPH, GRAPH_NODE, NODE_ATTRIBUTE, ATTRIBUTE_G = 7, 1, 5, 6


def nested_case(op, depth):
    """The conv seed whose scores pass through ``depth`` nested If (or Loop) bodies, each passing
    its value on unchanged. The file is assembled in wire format: protobuf's Python decoder stops
    at about 100 message levels (three per nesting level), so a ModelProto cannot hold the deeper ones."""
    value_info = helper.make_tensor_value_info
    body = None  # the serialised body graph of the level being built
    for level in range(depth):
        if op == "If":  # outputs v<level>: Identity(y) innermost, else the If around the level below
            nodes = [helper.make_node("Identity", ["y"], [f"v{level}"])] if body is None else []
            graph = helper.make_graph(nodes, f"body{level}", [], [value_info(f"v{level}", TensorProto.FLOAT, None)])
            inner = None if body is None else _control_node(op, None, f"v{level}", body, level)
        else:  # (i, c, x) -> (c, x): Identity(x) innermost, else the Loop around the level below
            inputs = [value_info(f"i{level}", TensorProto.INT64, []), value_info(f"c{level}", TensorProto.BOOL, []),
                      value_info(f"x{level}", TensorProto.FLOAT, None)]
            outputs = [value_info(f"co{level}", TensorProto.BOOL, []), value_info(f"xo{level}", TensorProto.FLOAT, None)]
            nodes = [helper.make_node("Identity", [f"c{level}"], [f"co{level}"])]
            if body is None:
                nodes.append(helper.make_node("Identity", [f"x{level}"], [f"xo{level}"]))
            graph = helper.make_graph(nodes, f"body{level}", inputs, outputs)
            inner = None if body is None else _control_node(op, f"x{level}", f"xo{level}", body, level)
        body = graph.SerializeToString() + (b"" if inner is None else _length_delimited(GRAPH_NODE, inner))
    proto = conv_classifier()
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "trip_count"),
                                    numpy_helper.from_array(np.array(True), "cond")])
    proto.graph.output[0].name = "scores"
    main = proto.graph.SerializeToString() + _length_delimited(GRAPH_NODE, _control_node(op, "y", "scores", body, depth))
    proto.ClearField("graph")
    files = {"model.onnx": proto.SerializeToString() + _length_delimited(MODEL_GRAPH, main)}
    return Case("nesting", f"conv: scores through {depth} nested {op} bodies", files)


def _control_node(op, carried, output, body, level):
    """The serialised If (then-branch ``body``, else-branch Identity(y)) or Loop (``body`` once,
    carrying ``carried``) that writes ``output``."""
    if op == "If":
        other = helper.make_graph([helper.make_node("Identity", ["y"], [f"e{level}"])], f"else{level}", [],
                                  [helper.make_tensor_value_info(f"e{level}", TensorProto.FLOAT, None)])
        node, attribute = helper.make_node("If", ["cond"], [output], else_branch=other), "then_branch"
    else:
        node, attribute = helper.make_node("Loop", ["trip_count", "cond", carried], [output]), "body"
    shell = helper.make_attribute(attribute, helper.make_graph([], "placeholder", [], []))
    shell.ClearField("g")
    return node.SerializeToString() + _length_delimited(NODE_ATTRIBUTE, shell.SerializeToString() +
                                                        _length_delimited(ATTRIBUTE_G, body))


# --------------------------------------------------------------------------------------- sandbox

class Sandbox:
    """The folders of a fuzzing run, under ``root`` (which must lie outside every SYSTEM_ROOT)::

        root/secret.bin      the secret: "../secret.bin" from the case folder; absolute attacks name it
        root/case/           the model's folder, rewritten for each case
        root/out/            where the worker saves the explainer
        root/cwd/            the worker's working directory; its weights.bin is a decoy secret
    """

    def __init__(self, root):
        self.root = os.path.realpath(root)
        if is_under(self.root, SYSTEM_ROOTS):
            raise ValueError(f"{self.root} lies in a system folder: reads of it would go unnoticed")
        self.case, self.out, self.cwd = (os.path.join(self.root, name) for name in ("case", "out", "cwd"))
        self.secret = os.path.join(self.root, "secret.bin")
        for folder in (self.case, self.out, self.cwd):
            os.makedirs(folder, exist_ok=True)
        for path in (self.secret, os.path.join(self.cwd, DATA_FILE)):
            with open(path, "wb") as f:
                f.write(SECRET)
        self.secret_files = {_identity(self.secret), _identity(os.path.join(self.cwd, DATA_FILE))}
        self.model = os.path.join(self.case, "model.onnx")
        self.explainer = os.path.join(self.out, "explainer.onnx")

    def prepare(self, case):
        """Write ``case`` into a fresh case folder and empty the output folder."""
        for folder in (self.case, self.out):
            shutil.rmtree(folder)
            os.makedirs(folder)
        for name, data in case.files.items():
            with open(os.path.join(self.case, name), "wb") as f:
                f.write(data)
        for name, special in case.specials.items():
            path = os.path.join(self.case, name)
            if special == "symlink-to-secret":
                os.symlink(os.path.relpath(self.secret, self.case), path)
            elif special == "hardlink-to-secret":
                os.link(self.secret, path)
            elif special == "fifo":
                os.mkfifo(path)
            else:
                os.makedirs(path)

    def outside_reads(self, paths, by_inode):
        """The ``paths`` (real paths of files read) outside the model's folder. ``by_inode``: a
        secret counts under any name, a hardlink inside the folder included."""
        allowed = (self.case, self.out, *SYSTEM_ROOTS)
        return sorted({path for path in paths if not os.path.isdir(path) and
                       ((by_inode and _identity(path) in self.secret_files) or
                        not (is_under(path, allowed) or path in SYSTEM_FILES))})

    def leaked(self):
        """Whether the explainer holds the secret's bytes."""
        if not os.path.exists(self.explainer):
            return False
        with open(self.explainer, "rb") as f:
            return LEAK_SIGNATURE in f.read()


def _identity(path):
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


# ---------------------------------------------------------------------------------------- worker

@dataclasses.dataclass
class Outcome:
    status: str        # success, typed, untyped, crash or hang
    error: str = ""    # the exception class, or the signal / exit status of a crash
    message: str = ""  # the exception's first line; for a crash, the fatal error's
    where: str = ""    # untyped exceptions, crashes and hangs: see ``where``
    reads_outside: tuple = ()

    @property
    def failure(self):
        return self.status in FAILURE_STATUSES or bool(self.reads_outside)

    @property
    def label(self):
        return {"success": "success", "typed": self.error, "hang": "hang"}.get(self.status, f"{self.status} {self.error}")


# strace: the open calls show the case markers; the others move a file's bytes into the worker.
TRACED_CALLS = ("open", "openat", "openat2")
READ_CALLS = ("read", "pread64", "readv", "preadv", "preadv2", "mmap", "sendfile", "copy_file_range")
# One call in strace's log, -y annotating each descriptor with its file: "123 read(3</a/b>, ""..., 4) = 3"
STRACE_CALL = re.compile(r"^(?P<pid>\d+) +(?P<call>\w+)\((?P<args>.*)\) += (?P<result>\S+)")
STRACE_UNFINISHED, STRACE_RESUMED = " <unfinished ...>", re.compile(r"^(?P<pid>\d+) +<\.\.\. (?P<call>\w+) resumed>")
STRACE_FILE = re.compile(r"\b\d+<(/[^>]*)>")


def strace_works():
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "true"], capture_output=True)
    return probe.returncode == 0


def _limit_worker():
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _unescape(text):
    """strace's C escapes (\\n, \\x01, \\177) back to the path."""
    return os.fsdecode(text.encode("latin-1").decode("unicode_escape").encode("latin-1"))


class Worker:
    """The converter in a persistent subprocess that answers one JSON line per case on stdin. A
    worker that crashes or hangs is killed, and the next case starts a new one.

    Reads: under strace (where it runs) every read, pread, readv, mmap, sendfile and
    copy_file_range of any thread that moved bytes, with the file it read; otherwise the worker's
    audit hook reports each Python-level open for reading (an open that reads nothing counts)."""

    def __init__(self, sandbox, timeout=30.0, strace=None):
        self.sandbox, self.timeout = sandbox, timeout
        self.strace = strace_works() if strace is None else strace
        self.process = None
        self.requests = self.starts = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.process is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
            self.process = None

    def _kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)  # the session it leads: the worker and its strace
        self.process.wait()

    def _start(self):
        self.starts += 1
        self.trace_log = os.path.join(self.sandbox.root, f"strace-{self.starts}.log")
        self.stderr_log = os.path.join(self.sandbox.root, f"stderr-{self.starts}.log")
        command = [sys.executable, os.path.abspath(__file__), "--worker"]
        if self.strace:
            command = ["strace", "-f", "--seccomp-bpf", "-qq", "-s", "0", "-y", "-e", "signal=none",
                       "-e", f"trace={','.join(TRACED_CALLS + READ_CALLS)}", "-o", self.trace_log, *command]
        else:
            command.append("--audit-opens")
        with open(self.stderr_log, "wb") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                            cwd=self.sandbox.cwd, start_new_session=True, preexec_fn=_limit_worker)
        self.pending, self.ended = b"", False
        self.trace_offset = 0
        ready = self._answer(timeout=180)
        if not ready or "pid" not in ready:
            raise RuntimeError(f"the fuzz worker did not start: {ready!r}; see {self.stderr_log}")
        self.worker_pid = ready["pid"]  # under strace, not the pid of the process started here

    def _answer(self, timeout):
        """The next JSON line from the worker, or None when it dies (``self.ended``) or ``timeout`` passes."""
        end = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.ended = True
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def request(self, action, **fields):
        """Send one request: its Outcome and the reads outside the model's folder."""
        if self.process is None:
            self._start()
        self.requests += 1
        request_id = self.requests
        stderr_offset = os.path.getsize(self.stderr_log)
        try:
            self.process.stdin.write(json.dumps({"id": request_id, "action": action, **fields}).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the answer below is None
        answer = self._answer(self.timeout)
        outcome = self._lost(stderr_offset) if answer is None else \
            Outcome(answer["status"], answer["error"], answer["message"], answer["where"])
        if self.strace:
            reads = self.sandbox.outside_reads(self._traced_reads(request_id, final=answer is None), by_inode=True)
        else:  # the audit hook knows opens by path: a hardlink to the secret is left to the sentinel
            reads = self.sandbox.outside_reads(answer["opened"] if answer else [], by_inode=False)
        outcome.reads_outside = tuple(reads)
        return outcome

    def _lost(self, stderr_offset):
        """The Outcome of a worker that died (crash) or did not answer (hang: it dumps its Python
        stack, then it is killed). Where, from faulthandler's dump on stderr."""
        status = "crash" if self.ended else "hang"
        if status == "hang":
            with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                os.kill(self.worker_pid, signal.SIGUSR1)
            time.sleep(1)
            self._kill()
        else:
            self.process.wait()  # strace ends a moment after the worker
        code = self.process.returncode
        with open(self.stderr_log, "rb") as f:
            f.seek(stderr_offset)
            stderr = f.read().decode(errors="replace")
        error = "" if status == "hang" else (signal.Signals(-code).name if code < 0 else f"exit {code}")
        self.process = None
        dump = stderr.rsplit("(most recent call first):", 1)
        frames = [(file, int(line), name) for file, line, name in FAULTHANDLER_FRAME.findall(dump[-1])][::-1]
        message = ""
        if status == "crash":
            fatal = [line for line in stderr.splitlines() if line.startswith("Fatal Python error")]
            message = fatal[-1] if fatal else " | ".join(stderr.strip().splitlines()[-4:])
        return Outcome(status, error, message, where(frames) if len(dump) == 2 else "")

    def _traced_reads(self, request_id, final):
        """Real paths of the files that request ``request_id`` read, from strace's log (all of it
        that is left when the worker is gone: ``final``)."""
        begin, end = f"{MARKER_FOLDER}/begin-{request_id}", f"{MARKER_FOLDER}/end-{request_id}"
        deadline = time.monotonic() + 10
        while True:  # strace writes the end marker a moment after the worker answers
            with open(self.trace_log, "rb") as f:
                f.seek(self.trace_offset)
                text = f.read().decode("latin-1")
            if final or end in text or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if end in text:
            text = text[:text.index(end)]
            self.trace_offset += len(text.encode("latin-1"))
        if begin in text:
            text = text[text.index(begin):]
        paths, unfinished = set(), {}
        for line in text.splitlines():
            if line.endswith(STRACE_UNFINISHED):
                unfinished[line.split()[0]] = line[:-len(STRACE_UNFINISHED)]
                continue
            resumed = STRACE_RESUMED.match(line)
            if resumed:
                line = unfinished.pop(resumed["pid"], "") + line[resumed.end():]
            call = STRACE_CALL.match(line)
            if call and call["call"] in READ_CALLS and call["result"] not in ("0", "-1"):
                paths.update(os.path.realpath(_unescape(p)) for p in STRACE_FILE.findall(call["args"]))
        return paths

    def run(self, case):
        """Convert ``case`` in the worker: its Outcome, with the reads outside the model's folder."""
        self.sandbox.prepare(case)
        outcome = self.request("convert", model=self.sandbox.model, out=self.sandbox.explainer)
        if outcome.status == "success" and self.sandbox.leaked():
            outcome.reads_outside += (f"the explainer holds the secret's bytes ({LEAK_SIGNATURE!r})",)
        return outcome


def serve(audit_opens):
    """The worker's loop: one JSON request per line on stdin, one JSON answer per line on stdout."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the answers
    faulthandler.enable()  # a crash leaves its Python stack on stderr, for the finding
    faulthandler.register(signal.SIGUSR1)  # so does a hang, when the parent gives up waiting
    import onnxruntime as ort

    import lrp_onnx

    lrp_onnx.convert(conv_classifier())  # the first conversion imports lazily (sympy, ...): not a case's reads
    opened = []

    def record(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            flags = args[2] if isinstance(args[2], int) else 0
            path = os.fsdecode(args[0])
            if flags & os.O_ACCMODE != os.O_WRONLY and os.path.exists(path):
                opened.append(os.path.realpath(path))

    if audit_opens:
        sys.addaudithook(record)
    answers.write(json.dumps({"pid": os.getpid()}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        _mark("begin", request["id"])
        del opened[:]
        answer = _handle(request, lrp_onnx, ort)
        answer["opened"] = opened
        _mark("end", request["id"])
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def _mark(phase, request_id):
    """An open that fails, for strace's log: where request ``request_id`` begins or ends."""
    try:
        os.open(f"{MARKER_FOLDER}/{phase}-{request_id}", os.O_RDONLY)
    except FileNotFoundError:
        pass


def _handle(request, lrp_onnx, ort):
    """convert: the contract under test. read, ort-session and segfault check the harness: a
    Python read, a C++ read, and a crash."""
    try:
        if request["action"] == "convert":
            lrp_onnx.save_model(lrp_onnx.convert(request["model"]), request["out"])
        elif request["action"] == "read":
            with open(request["path"], "rb") as f:
                f.read()
        elif request["action"] == "ort-session":
            ort.InferenceSession(request["model"], providers=["CPUExecutionProvider"])
        else:
            ctypes.string_at(0)  # reads address 0: a genuine segmentation fault
        return {"status": "success", "error": "", "message": "", "where": ""}
    except lrp_onnx.LrpOnnxError as e:
        return {"status": "typed", "error": type(e).__name__, "message": _first_line(e), "where": ""}
    except Exception as e:  # the failures this harness looks for: say where they come from
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(e.__traceback__)]
        return {"status": "untyped", "error": type(e).__name__, "message": _first_line(e), "where": where(frames)}


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


FAULTHANDLER_FRAME = re.compile(r'File "(.*)", line (\d+) in (\S+)')
LIBRARY_PATH = re.compile(r".*/(?:site|dist)-packages/")
STDLIB = sysconfig.get_paths()["stdlib"]


def where(frames):
    """The innermost lrp_onnx frame of ``frames`` (outermost first), then the innermost one where
    it differs: "lrp_onnx/load.py:225 fold_constants → onnx_graphsurgeon/ir/graph.py:1320 fold_subgraphs"."""
    def name(frame):
        file, line, function = frame
        if file.startswith(ROOT + "/"):
            file = os.path.relpath(file, ROOT)
        elif file.startswith(STDLIB + "/"):
            file = os.path.relpath(file, STDLIB)
        return f"{LIBRARY_PATH.sub('', file)}:{line} {function}"
    ours = [f for f in frames if f[0].startswith(os.path.join(ROOT, "lrp_onnx"))]
    shown = ([ours[-1]] if ours else []) + ([frames[-1]] if frames and (not ours or frames[-1] != ours[-1]) else [])
    return " → ".join(name(f) for f in shown)


# ---------------------------------------------------------------------------------------- tally

@dataclasses.dataclass
class Finding:
    label: str
    message: str
    where: str
    kind: str
    description: str  # the shortest reproducer of the group
    count: int = 1


class Tally:
    """Executions by mutation kind, outcomes by label, and failures grouped into findings."""

    def __init__(self):
        self.kinds, self.outcomes, self.findings = Counter(), Counter(), {}
        self.reads_outside = 0

    def add(self, case, outcome):
        self.kinds[case.kind] += 1
        self.outcomes[outcome.label] += 1
        self.reads_outside += bool(outcome.reads_outside)
        if not outcome.failure:
            return
        message = outcome.message
        if outcome.reads_outside:
            message = f"reads outside: {', '.join(outcome.reads_outside)}" + (f"; {message}" if message else "")
        # One group per bug: an exception or a hang by its innermost lrp_onnx frame, whatever the
        # data in its message (or the frame a hang happened to stop in); the rest by message.
        site = outcome.where.split(" → ")[0] or re.sub(r"\d+|'[^']*'", "_", message)
        self._record((outcome.label, site, bool(outcome.reads_outside)),
                     Finding(outcome.label, message, outcome.where, case.kind, case.description))

    def _record(self, key, finding):
        known = self.findings.setdefault(key, dataclasses.replace(finding, count=0))
        known.count += finding.count
        if len(finding.description) < len(known.description):
            known.message, known.where, known.kind, known.description = (finding.message, finding.where, finding.kind,
                                                                         finding.description)

    def merge(self, other):
        self.kinds.update(other.kinds)
        self.outcomes.update(other.outcomes)
        self.reads_outside += other.reads_outside
        for key, finding in other.findings.items():
            self._record(key, finding)

    @property
    def executions(self):
        return sum(self.kinds.values())

    @property
    def failure_count(self):
        return sum(f.count for f in self.findings.values())

    def failures(self):
        return sorted(self.findings.values(), key=lambda f: -f.count)

    def report_failures(self):
        return "\n".join(f"{f.count} × {f.label}: {f.message}" + (f" [at {f.where}]" if f.where else "") +
                         f"\n    reproducer ({f.kind}): {f.description!r}" for f in self.failures())


def fuzz(worker, strategy, examples, seed=None):
    """Run ``examples`` cases drawn from ``strategy`` through ``worker``; the Tally. Deterministic
    without ``seed``. Failures are recorded, not raised, so that one run lists every finding."""
    tally = Tally()

    @settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def execute(case):
        tally.add(case, worker.run(case))

    if seed is not None:
        execute = hypothesis_seed(seed)(execute)
    execute()
    return tally


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    serve(audit_opens="--audit-opens" in sys.argv)

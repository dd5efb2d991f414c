"""Untrusted model files: external data read only from inside the model's folder and written beside
the output, malformed files refused with a typed error and a documented exit code, never a crash.

The attacks on external-data locations (``..``, absolute, symlink, hardlink, NUL, offsets) are in
tests/test_fuzz_loader.py, together with the fuzzer that mutates files like these."""

import hashlib
import os
import re
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters
import lrp_onnx
from lrp_onnx.cli import main
from lrp_onnx.emit import convert_held
from lrp_onnx.external import DATA_SUFFIX, HELD_LOCATION, LARGE_TENSOR_BYTES
from lrp_onnx.load import subgraph_depth
from test_cli import assert_bad_input, cli, only_files

FEATURES, CLASSES = 600, 500  # the weight is 1.2 MB: above LARGE_TENSOR_BYTES, so it goes external on save


def dense_classifier(features=FEATURES, classes=CLASSES, input_dims=("N", FEATURES)):
    """x [N, F] → Gemm(transB) → Relu → Gemm → logits [N, C]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((classes, features)).astype(np.float32) / 20, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((classes, classes)).astype(np.float32) / 20, "w2")
    b = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], [w1, w2, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(proto, path, location="weights.bin"):
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


@pytest.fixture
def external_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_external(dense_classifier(), folder / "dense.onnx")
    return folder / "dense.onnx"


def test_external_data_converts_like_the_inline_model(external_model):
    x = np.random.default_rng(1).standard_normal((3, FEATURES)).astype(np.float32)
    from_file = lrp_onnx.Explainer(lrp_onnx.convert(str(external_model), "epsilon")).explain(x)
    inline = lrp_onnx.Explainer(lrp_onnx.convert(dense_classifier(), "epsilon")).explain(x)
    np.testing.assert_array_equal(from_file[1], inline[1])
    np.testing.assert_array_equal(from_file[0]["logits"], inline[0]["logits"])


def test_cli_writes_external_data_beside_the_output_and_leaves_the_input(external_model, tmp_path):
    before = digests(external_model.parent)
    out = tmp_path / "out" / "explainer.onnx"
    out.parent.mkdir()
    result = cli("convert", external_model, "-o", out, "--composite", "epsilon")
    assert result.returncode == 0, result.stderr
    assert digests(external_model.parent) == before
    assert only_files(out.parent) == ["explainer.onnx", "explainer.onnx" + DATA_SUFFIX]
    graph = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"explainer.onnx" + DATA_SUFFIX}
    assert out.stat().st_size < LARGE_TENSOR_BYTES  # the weights are in the data file, not the graph

    x = np.random.default_rng(2).standard_normal((2, FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # ORT reads it unaided
    relevance = session.run(["relevance"], {"x": x, "target": np.array([-1, 3])})[0]
    expected = lrp_onnx.Explainer(str(external_model), composite="epsilon").explain(x, [-1, 3])[1]
    np.testing.assert_allclose(relevance, expected, rtol=1e-6, atol=1e-7)
    assert lrp_onnx.Explainer(str(out)).explain(x)[1].shape == x.shape


def test_cli_never_writes_over_the_inputs_data_file(tmp_path):
    """-o names an output whose data file would be the input's own weights: refused even with --force."""
    save_external(dense_classifier(), tmp_path / "dense.onnx", location="out.onnx" + DATA_SUFFIX)
    before = digests(tmp_path)
    assert_bad_input(cli("convert", tmp_path / "dense.onnx", "-o", tmp_path / "out.onnx", "--force"),
                     "refusing to overwrite the input model's file", code=6)
    assert digests(tmp_path) == before


def test_cli_needs_force_for_an_existing_data_file(external_model):
    data = external_model.parent / ("dense.lrp.onnx" + DATA_SUFFIX)
    data.write_bytes(b"keep me")
    assert_bad_input(cli("convert", external_model), "exists", "--force", code=6)
    assert data.read_bytes() == b"keep me" and not (external_model.parent / "dense.lrp.onnx").exists()


def test_external_data_needs_the_models_path(external_model):
    """Bytes carry no folder: external locations cannot be resolved, so they are not guessed."""
    with pytest.raises(lrp_onnx.ModelLoadError, match="pass the model's path"):
        lrp_onnx.convert(external_model.read_bytes())


def test_a_missing_data_file(external_model):
    os.remove(external_model.parent / "weights.bin")
    with pytest.raises(lrp_onnx.ModelLoadError, match="'weights.bin' is missing"):
        lrp_onnx.convert(str(external_model))


@pytest.mark.parametrize("external_data", [False, True], ids=["one-file", "external-data"])
@pytest.mark.parametrize("source", ["inline", "external"])
def test_held_weights_are_saved_byte_for_byte_as_the_converted_model(source, external_data, external_model, tmp_path):
    """``convert_held`` keeps the large weight (w1, 1.2 MB) out of the proto it returns, and
    ``save_model`` writes from it exactly the files that ``convert``'s proto gives, without
    changing a ModelProto it was given."""
    model = str(external_model) if source == "external" else dense_classifier()
    before = model if isinstance(model, str) else model.SerializeToString()
    proto, held = convert_held(model, "epsilon")
    references = [t.name for t in proto.graph.initializer if held.holds(t)]
    assert references == ["w1"] and held.nbytes == CLASSES * FEATURES * 4
    assert all(len(t.raw_data) <= LARGE_TENSOR_BYTES for t in proto.graph.initializer)
    direct, from_held = tmp_path / "direct", tmp_path / "held"
    for folder in (direct, from_held):
        folder.mkdir()
    lrp_onnx.save_model(lrp_onnx.convert(model, "epsilon"), direct / "e.onnx", external_data=external_data)
    lrp_onnx.save_model(proto, from_held / "e.onnx", external_data=external_data, held=held)
    assert digests(from_held) == digests(direct)
    assert len(digests(direct)) == (2 if external_data else 1)
    assert (model if isinstance(model, str) else model.SerializeToString()) == before
    assert [t.name for t in proto.graph.initializer if held.holds(t)] == ["w1"]  # saving left the proto as it was


def test_large_weights_that_subgraphs_read(tmp_path):
    """If branches read large weights of the main graph, one that the main graph reads too (w1)
    and one that it does not: they reach the branches with their values, and the explainer's side
    output equals the model's, saved either way."""
    model = dense_classifier()
    side = numpy_helper.from_array(np.random.default_rng(3).standard_normal((CLASSES, FEATURES)).astype(np.float32),
                                   "side_w")
    model.graph.initializer.append(side)
    # each reads x too, or folding would make its output a constant
    branch = {name: helper.make_graph([helper.make_node("Gemm", ["x", weight], [f"{name}_y"], transB=1),
                                       helper.make_node("ReduceSum", [f"{name}_y"], [f"{name}_sum"], keepdims=0),
                                       helper.make_node(op, [f"{name}_sum"], [f"{name}_out"])], name, [],
                                      [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [])])
              for name, weight, op in (("then", "side_w", "Identity"), ("else", "w1", "Neg"))}
    model.graph.node.extend([
        helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Greater", ["x_sum", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["side"], then_branch=branch["then"], else_branch=branch["else"])])
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, []))
    x = np.random.default_rng(4).standard_normal((2, FEATURES)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    proto, held = convert_held(model, "epsilon")
    for sign in (1, -1):  # the then branch, then the else branch
        expected = session.run(["side"], {"x": sign * x})[0]
        for external_data in (False, True):
            path = tmp_path / f"{external_data}.onnx"
            lrp_onnx.save_model(proto, path, external_data=external_data, held=held)
            explainer = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            side = explainer.run(["side"], {"x": sign * x, "target": np.array([-1, -1])})[0]
            np.testing.assert_allclose(side, expected, rtol=1e-6)


def test_a_held_location_in_a_given_model_is_refused():
    """The location that marks held bytes cannot come from outside: in a ModelProto it is external
    data like any other (refused without a path); a file cannot name it at all (NUL, test_fuzz_loader)."""
    proto = dense_classifier()
    w1 = proto.graph.initializer[0]
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    w1.external_data.add(key="location", value=HELD_LOCATION + "0")
    with pytest.raises(lrp_onnx.ModelLoadError, match="'w1' keeps its data in an external file"):
        lrp_onnx.convert(proto, "epsilon")


def _free_gib(kind):
    if kind == "memory":
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


@pytest.mark.skipif(_free_gib("memory") < 16 or _free_gib("disk") < 8,
                    reason="needs 16 GiB of free memory (conversion peaks near 14 GiB) and 8 GiB of disk")
def test_a_model_past_2gb_converts_saves_and_runs(tmp_path):
    weights = exporters.split_gemm_past_2gb(tmp_path)
    result = cli("convert", tmp_path / "big.onnx", "--composite", "epsilon")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "big.lrp.onnx"
    assert (tmp_path / ("big.lrp.onnx" + DATA_SUFFIX)).stat().st_size > 2**31 and out.stat().st_size < 2**20

    x = np.random.default_rng(5).standard_normal((2, 2 * weights.shape[2])).astype(np.float32)
    target = np.array([7, 300])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, relevance = session.run(["logits", "relevance"], {"x": x, "target": target})
    rows = np.concatenate([weights[0, target], weights[1, target]], axis=1)  # W_t of each sample: [N, 2F]
    contributions = x * rows  # x_i · W_ti, the epsilon rule's numerator
    np.testing.assert_allclose(logits[[0, 1], target], contributions.sum(1), rtol=1e-4)
    # ε = 1e-6 against logits of size ~25: relevance is the contribution, up to the stabilizer's share
    np.testing.assert_allclose(relevance, contributions, rtol=1e-3, atol=1e-6 * np.abs(contributions).max())


def nested_graph_bytes(depth):
    """A model whose If node nests ``depth`` then-branches, encoded on the wire by hand: the
    protobuf library refuses to build one this deep, but an attacker's file need not come from it."""
    def field(number, payload):  # wire type 2: tag, length, bytes
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    graph = b""
    for _ in range(depth):
        attribute = field(1, b"then_branch") + _varint(20 << 3) + _varint(onnx.AttributeProto.GRAPH) + field(6, graph)
        node = field(1, b"c") + field(2, b"o") + field(4, b"If") + field(5, attribute)
        graph = field(1, node)
    opset = field(1, b"") + _varint(2 << 3) + _varint(17)
    return _varint(1 << 3) + _varint(8) + field(7, graph) + field(8, opset)


def _varint(value):
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _edited(edit):
    proto = dense_classifier()
    edit(proto)
    return proto.SerializeToString()


def _set(field, value):
    return lambda proto: setattr(proto, field, value)


def _weight_dims(*dims):
    def edit(proto):
        del proto.graph.initializer[0].dims[:]
        proto.graph.initializer[0].dims.extend(dims)
    return edit


def _input_dims(*dims):
    return lambda proto: proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims)))


def _output_type(elem_type=None):
    """The output's type without a shape field: ONNX Runtime runs that, the ONNX checker refuses it.
    ``elem_type`` None: a tensor type without an element type either."""
    def edit(proto):
        tensor = proto.graph.output[0].type.tensor_type
        tensor.ClearField("shape")
        tensor.ClearField("elem_type")
        if elem_type is not None:
            tensor.elem_type = elem_type
    return edit


def _typed_field_too_short(proto):
    bias = proto.graph.initializer[2]
    values = numpy_helper.to_array(bias)
    bias.ClearField("raw_data")
    bias.float_data.extend(values[:-1])


MALFORMED = {
    "empty file": (b"", "the file is empty"),
    "truncated": (dense_classifier().SerializeToString()[:5000], "truncated"),
    "random bytes": (np.random.default_rng(0).bytes(5000), "not an ONNX model"),
    "ir_version 0": (_edited(_set("ir_version", 0)), "ir_version"),
    "empty graph": (_edited(lambda proto: proto.graph.ClearField("node")), "no nodes"),
    "negative input dims": (_edited(_input_dims("N", -FEATURES)), "negative dims"),
    "overflowing input dims": (_edited(_input_dims(2**40, 2**40)), "overflows int64"),
    "negative weight dims": (_edited(_weight_dims(-CLASSES, -FEATURES)), "negative dims"),
    "overflowing weight dims": (_edited(_weight_dims(2**62, 2**62, 8)), "data length does not match dims"),
    "raw data too short": (_edited(lambda proto: setattr(proto.graph.initializer[0], "raw_data", b"\0" * 8)),
                           "holds 8 bytes but its dims"),
    "typed data too short": (_edited(_typed_field_too_short), f"holds {CLASSES - 1} values"),
    "declared shape against the weights": (_edited(_input_dims("N", FEATURES + 1)), "fails the ONNX checker"),
    "nested subgraphs 200 deep": (nested_graph_bytes(200), "subgraphs nested 200 deep; protobuf parses at most 33"),
    "opset imported twice": (_edited(lambda proto: proto.opset_import.add(domain="", version=9)),
                             "imports opset domain(s) [''] at more than one version"),
    "a node name that is not UTF-8": (dense_classifier().SerializeToString().replace(b"relu", b"r\xffl\xfe"),
                                      "not UTF-8"),
    "unknown element type": (_edited(lambda proto: setattr(proto.graph.output[0].type.tensor_type, "elem_type", 99)),
                             "fails the ONNX checker"),
    "an input without a shape": (_edited(lambda proto: proto.graph.input[0].type.tensor_type.ClearField("shape")),
                                 "input 'x' declares no shape"),
    # Outputs without a shape convert (test_an_output_without_a_shape_converts_with_one_warning) unless
    # what they do declare is wrong, as ONNX Runtime finds too:
    "an output without a shape or an element type": (_edited(_output_type()),
                                                     "fails the ONNX checker: Field 'elem_type'"),
    "an output without a shape, of a type the graph contradicts": (_edited(_output_type(TensorProto.INT64)),
                                                                    "Inferred elem type differs"),
}
ONNX_RUNTIME_REFUSES = ("an output without a shape or an element type",
                        "an output without a shape, of a type the graph contradicts")


def test_the_hand_encoded_nesting_is_a_model_protobuf_can_read_at_depth_20():
    graph, depth = onnx.load_from_string(nested_graph_bytes(20)).graph, 0
    while graph.node:
        graph, depth = graph.node[0].attribute[0].g, depth + 1
    assert depth == 20


@pytest.mark.parametrize("depth", [0, 1, 20, 33, 34])
def test_the_wire_format_nesting_depth_matches_the_encoded_depth(depth):
    assert subgraph_depth(nested_graph_bytes(depth)) == depth


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_a_model_load_error(tmp_path, case):
    data, phrase = MALFORMED[case]
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with pytest.raises(lrp_onnx.ModelLoadError, match=re.escape(phrase)) as raised:
        lrp_onnx.convert(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("case", ["empty file", "overflowing weight dims", "nested subgraphs 200 deep"])
def test_malformed_files_exit_with_code_3_and_write_nothing(tmp_path, case):
    path = tmp_path / "model.onnx"
    path.write_bytes(MALFORMED[case][0])
    assert_bad_input(cli("convert", path), MALFORMED[case][1], code=3)
    assert only_files(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("case", ONNX_RUNTIME_REFUSES)
def test_an_output_without_a_shape_is_refused_where_onnx_runtime_refuses_it(case):
    data, phrase = MALFORMED[case]
    with pytest.raises(Exception, match=re.escape("[ONNXRuntimeError]")):
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrp_onnx.ModelWarning)  # no warning that it converts, either
        with pytest.raises(lrp_onnx.ModelLoadError, match=re.escape(phrase)):
            lrp_onnx.convert(data)


@pytest.mark.parametrize("missing", ["shape", "type"])
def test_an_output_without_a_shape_converts_with_one_warning(tmp_path, capsys, missing):
    """The ONNX checker requires a shape on every graph output; ONNX Runtime takes it from the graph."""
    proto = dense_classifier()  # its first weight is large: the shape is inferred on a shell
    output = proto.graph.output[0]
    if missing == "type":
        output.ClearField("type")
    else:
        output.type.tensor_type.ClearField("shape")
    x = np.random.default_rng(6).standard_normal((3, FEATURES)).astype(np.float32)
    logits = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with pytest.warns(lrp_onnx.ModelWarning, match=f"output 'logits' declares no {missing}") as warned:
        explainer = lrp_onnx.convert(proto, "epsilon")
    assert len(warned) == 1 and f"[N, {CLASSES}]" in str(warned[0].message)
    assert helper.printable_type(explainer.graph.output[0].type) == f"FLOAT, Nx{CLASSES}"
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    explained, relevance = session.run(["logits", "relevance"], {"x": x, "target": np.array([-1, 0, 7])})
    np.testing.assert_array_equal(explained, logits)
    assert relevance.shape == x.shape and np.isfinite(relevance).all()

    path, out = tmp_path / "model.onnx", tmp_path / "model.lrp.onnx"
    onnx.save_model(proto, str(path))
    assert main(["convert", str(path), "-o", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lrp-onnx: warning: {path}: output 'logits' declares no {missing}, "
                                                   "which the ONNX checker requires"), lines
    assert out.exists()


def test_moderately_nested_subgraphs_convert_and_run(tmp_path):
    """Depth 25, which protobuf still builds, on an If whose flag is a second graph output."""
    def flag(name):
        return helper.make_tensor_value_info(name, TensorProto.BOOL, [])

    def leaf(name):
        return helper.make_graph([helper.make_node("Identity", ["c"], [name])], name, [], [flag(name)])
    branch = leaf("o0")
    for depth in range(1, 26):
        node = helper.make_node("If", ["c"], [f"o{depth}"], then_branch=branch, else_branch=leaf(f"e{depth}"))
        branch = helper.make_graph([node], f"then{depth}", [], [flag(f"o{depth}")])
    proto = dense_classifier()
    proto.graph.node.append(helper.make_node("If", ["c"], ["flag"], then_branch=branch, else_branch=leaf("e0")))
    proto.graph.input.append(flag("c"))
    proto.graph.output.append(flag("flag"))
    x = np.random.default_rng(3).standard_normal((2, FEATURES)).astype(np.float32)
    outputs, relevance = lrp_onnx.Explainer(lrp_onnx.convert(proto, "epsilon")).explain(x, c=np.array(True))
    assert outputs["flag"] and np.isfinite(relevance).all()

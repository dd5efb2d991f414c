"""Triton Inference Server export: config.pbtxt against Triton's ModelConfig schema and the ONNX
file, atomic writes, the CLI, and (where nvidia-pytriton's tritonserver is installed) a real server
answering concurrent requests exactly as in-process ONNX Runtime does."""

import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx import triton
from lrp_onnx.errors import InputError, OutputError
from tritonclient.grpc.model_config_pb2 import DataType  # the test extra has tritonclient: no skip hides a failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import triton_load  # noqa: E402


@pytest.fixture(scope="module")
def explainer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("explainer") / "digits_cnn.lrp.onnx"
    lrp_onnx.save_model(lrp_onnx.convert(os.path.join(ROOT, "models", "digits_cnn.onnx")), str(path))
    return str(path)


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_config_matches_the_onnx_file(tmp_path, explainer_path, backend):
    files = triton.export_triton(explainer_path, tmp_path, backend=backend)
    folder = tmp_path / "digits_cnn"
    assert sorted(os.listdir(tmp_path)) == ["digits_cnn"]  # no temporary folder left behind
    assert sorted(files) == sorted(str(folder / f) for f in ["config.pbtxt", "1/model.onnx"]
                                   + (["1/model.py"] if backend == "python" else []))
    config = triton.validate_config(folder / "config.pbtxt")
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds > 0
    engine = ("onnxruntime_onnx", "") if backend == "onnxruntime" else ("", "python")
    assert (config.platform, config.backend) == engine
    # Read independently of the exporter: every tensor's type and shape past the batch axis.
    model = onnx.load(folder / "1" / "model.onnx")
    assert model.SerializeToString() == onnx.load(explainer_path).SerializeToString()
    types = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64"}
    for written, declared in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in written] == [v.name for v in declared]
        for tensor, value in zip(written, declared):
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert DataType.Name(tensor.data_type) == types[value.type.tensor_type.elem_type]
            assert list(tensor.dims) == (shape[1:] or [1])
            assert tensor.HasField("reshape") == (len(shape) == 1)  # per-sample scalars: [1] reshaped to []
    target = next(t for t in config.input if t.name == "target")
    assert target.optional == (backend == "python")  # the ONNX graph itself requires target


def test_dynamic_non_batch_dims_become_minus_one(tmp_path):
    text = lrp_onnx.convert(os.path.join(ROOT, "models", "sentiment_bert.onnx"))
    triton.export_triton(text, tmp_path, name="sentiment")
    config = triton.validate_config(tmp_path / "sentiment" / "config.pbtxt")
    dims = {t.name: list(t.dims) for t in list(config.input) + list(config.output)}
    assert dims["input_ids"] == dims["attention_mask"] == dims["relevance"] == [-1]
    assert dims["logits"] == [2]


@pytest.mark.parametrize("edit, phrase", [
    (lambda t: t.replace("TYPE_FP32", "TYPE_FP3", 1), "not a valid Triton model config"),
    (lambda t: t.replace("max_batch_size", "max_batchsize"), "not a valid Triton model config"),
    (lambda t: t.replace("dims: [ 1, 8, 8 ]", "dims: [ 1, 8, 9 ]", 1), "inputs do not match"),
    (lambda t: t.replace("TYPE_INT64", "TYPE_INT32", 1), "inputs do not match"),
    (lambda t: t.replace("    reshape: { shape: [ ] }\n", "", 1), "inputs do not match"),
    (lambda t: t.replace('name: "logits"', 'name: "scores"'), "outputs do not match"),
    (lambda t: t.replace('name: "digits_cnn"', 'name: "other"'), "is not the model folder's"),
    (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 0"), "max_batch_size 0"),
])
def test_an_altered_config_fails_validation(tmp_path, explainer_path, edit, phrase):
    triton.export_triton(explainer_path, tmp_path)
    path = tmp_path / "digits_cnn" / "config.pbtxt"
    triton.validate_config(path)
    altered = edit(read(path))
    assert altered != read(path)
    write(path, altered)
    with pytest.raises(InputError, match=phrase):
        triton.validate_config(path)


def test_an_existing_model_is_replaced_only_with_force(tmp_path, explainer_path):
    triton.export_triton(explainer_path, tmp_path)
    config = tmp_path / "digits_cnn" / "config.pbtxt"
    before = read(config)
    with pytest.raises(OutputError, match="exists; pass --force"):
        triton.export_triton(explainer_path, tmp_path, backend="python")
    assert read(config) == before
    triton.export_triton(explainer_path, tmp_path, backend="python", max_batch_size=4, force=True)
    assert 'backend: "python"' in read(config) and "max_batch_size: 4" in read(config)
    assert sorted(os.listdir(tmp_path)) == ["digits_cnn"]


def test_a_failed_export_leaves_nothing(tmp_path, explainer_path, monkeypatch):
    real = triton.config_text
    monkeypatch.setattr(triton, "config_text", lambda *a: real(*a).replace("TYPE_FP32", "TYPE_NOPE"))
    with pytest.raises(InputError, match="not a valid Triton model config"):
        triton.export_triton(explainer_path, tmp_path)
    assert os.listdir(tmp_path) == []


def test_bad_requests_are_one_line_input_errors(tmp_path, explainer_path):
    with pytest.raises(InputError, match="not an explainer graph"):
        triton.export_triton(os.path.join(ROOT, "models", "digits_cnn.onnx"), tmp_path)
    with pytest.raises(InputError, match="model name"):
        triton.export_triton(explainer_path, tmp_path, name="../escape")
    with pytest.raises(InputError, match="backend"):
        triton.export_triton(explainer_path, tmp_path, backend="tensorrt")
    with pytest.raises(InputError, match="needs a model name"):
        triton.export_triton(onnx.load(explainer_path), tmp_path)
    assert os.listdir(tmp_path) == []


def test_shapes_triton_cannot_batch_are_refused():
    def model(shape):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
        return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))

    assert triton.tensor_entries(model(["N", "T", 3]))[0][0]["dims"] == [-1, 3]
    with pytest.raises(InputError, match="fixed batch axis of 1"):
        triton.tensor_entries(model([1, 3]))
    with pytest.raises(InputError, match="no batch axis"):
        triton.tensor_entries(model(None))


def test_external_data_travels_with_the_model(tmp_path):
    """A classifier whose weights pass 1 MiB: its explainer, saved with external data, is exported
    with model.onnx.data beside model.onnx, and runs from there."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor("w", TensorProto.FLOAT, [600, 600], rng.normal(size=360000).astype(np.float32)),
               helper.make_tensor("head", TensorProto.FLOAT, [600, 3], rng.normal(size=1800).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 600])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], weights)
    classifier = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "wide.lrp.onnx"
    lrp_onnx.save_model(lrp_onnx.convert(classifier), str(source), external_data=True)
    files = triton.export_triton(str(source), tmp_path / "repo")
    data = tmp_path / "repo" / "wide" / "1" / "model.onnx.data"
    assert str(data) in files and data.stat().st_size > 1 << 20
    triton.validate_config(tmp_path / "repo" / "wide" / "config.pbtxt")
    feeds = {"x": rng.normal(size=(2, 600)).astype(np.float32), "target": np.array([-1, 1], np.int64)}
    exported = ort.InferenceSession(str(data)[:-len(".data")]).run(None, feeds)
    for got, want in zip(exported, ort.InferenceSession(str(source)).run(None, feeds)):
        np.testing.assert_array_equal(got, want)


def test_cli_export_triton(tmp_path, explainer_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "export-triton", *map(str, args)],
                              capture_output=True, text=True)

    result = cli(explainer_path, tmp_path, "--name", "digits", "--backend", "python", "--max-batch-size", "16")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'digits' / 'config.pbtxt'}" in result.stdout and "python backend" in result.stdout
    assert triton.validate_config(tmp_path / "digits" / "config.pbtxt").max_batch_size == 16
    again = cli(explainer_path, tmp_path, "--name", "digits")
    assert again.returncode == 6 and again.stderr.startswith("lrp-onnx: error: ") and "--force" in again.stderr
    plain = cli(os.path.join(ROOT, "models", "digits_cnn.onnx"), tmp_path)
    assert plain.returncode == 2 and "not an explainer graph" in plain.stderr


# The test command installs the server (README); in CI (CI set) a missing one fails instead of skipping.
@pytest.mark.skipif(triton_load.server_files(triton_load.DEFAULT_VENV) is None and not os.environ.get("CI"),
                    reason=f"no nvidia-pytriton tritonserver in {triton_load.DEFAULT_VENV} (set LRP_ONNX_TRITON_VENV); "
                           "install: python3 -m venv .triton-venv && .triton-venv/bin/pip install "
                           "'numpy<2' onnxruntime nvidia-pytriton")
def test_a_real_server_answers_concurrent_requests_as_onnx_runtime(tmp_path):
    import tritonclient.grpc as grpcclient

    model_path = triton_load.export_digits(str(tmp_path))
    session = ort.InferenceSession(model_path)
    samples = np.load(os.path.join(ROOT, "models", "digits_samples.npy")).astype(np.float32)
    failures = []

    def client_loop(seed):
        client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng(seed)
        for i in range(12):
            image = samples[rng.integers(len(samples), size=1 + i % 3)]  # batches of 1 to 3
            target = rng.integers(10, size=len(image)).astype(np.int64) if i % 2 else None
            try:
                got = triton_load.request(client, image, target)
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            difference = triton_load.largest_difference(got, triton_load.reference(session, image, target))
            if difference > 1e-5:
                failures.append(f"differs from ONNX Runtime by {difference:g}")

    with triton_load.tritonserver(str(tmp_path)) as url:
        threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        inferences, executions = triton_load.model_statistics(url)
        # the graph contract through the server: a target past the classes or below -1 is flagged, not explained
        invalid = triton_load.request(grpcclient.InferenceServerClient(url), samples[:3], np.array([10, 3, -2]))
    assert failures == []
    assert invalid["explained_class"].tolist() == [-1, 3, -1]
    assert np.isnan(invalid["relevance"][[0, 2]]).all() and np.isnan(invalid["explained_logit"][[0, 2]]).all()
    assert inferences == sum(1 + i % 3 for i in range(12)) * 4 and 0 < executions <= 48

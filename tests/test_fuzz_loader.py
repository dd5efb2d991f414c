"""Fuzzing the loader (issue 7): mutated model files go through ``lrp_onnx.convert`` in a worker
subprocess (tests/fuzz_models.py). Each must convert or raise a typed LrpOnnxError, without an
untyped exception, a crash, a hang or a read outside the model's folder. Each attack on external
data is also named here, with the CLI's exit code. benchmarks/fuzz_loader.py runs the same
harness for thousands of executions and writes RELIABILITY.md."""

import os
import re
import subprocess
import sys

import pytest

import fuzz_models as fm
import lrp_onnx

# A case converts in well under a second; the worker needs a few more to restart after a hang.
CASE_TIMEOUT = 10
UNSAFE_EXIT_CODE = 4  # cli.EXIT_CODES for UnsafeModelError


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return fm.Sandbox(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def worker(sandbox):
    with fm.Worker(sandbox, timeout=CASE_TIMEOUT) as worker:
        yield worker


@pytest.mark.parametrize("seed", fm.SEEDS)
def test_seed_models_convert_without_reading_outside(worker, seed):
    outcome = worker.run(fm.Case("seed", seed, dict(fm.seed_files(seed))))
    assert outcome.status == "success" and not outcome.reads_outside, outcome


def test_detection_sees_a_python_read_of_the_secret(worker, sandbox):
    outcome = worker.request("read", path=sandbox.secret)
    assert outcome.status == "success" and outcome.reads_outside == (sandbox.secret,)


def test_detection_sees_onnxruntime_read_a_hardlinked_secret_in_cpp(worker, sandbox):
    """ONNX Runtime loads external data from a hardlink to a file outside the folder, in C++."""
    if not worker.strace:
        pytest.skip("reads from C++ are seen only under strace, which cannot run here")
    files = {"model.onnx": fm.seed_files(fm.EXTERNAL_SEED)["model.onnx"]}
    sandbox.prepare(fm.Case("probe", "data file hardlinked to the secret", files, {fm.DATA_FILE: "hardlink-to-secret"}))
    outcome = worker.request("ort-session", model=sandbox.model)
    assert outcome.status == "success" and outcome.reads_outside == (os.path.join(sandbox.case, fm.DATA_FILE),)


def test_detection_sees_the_secrets_bytes_in_an_explainer(worker):
    """A model whose dense weights are the secret's bytes (legitimately: inline): the signature
    survives conversion, so a secret read through any channel would show in the explainer."""
    proto = fm.conv_classifier()
    dense = next(t for t in proto.graph.initializer if t.name == "G")
    dense.raw_data = fm.SECRET[:len(dense.raw_data)]
    files = {"model.onnx": proto.SerializeToString()}
    outcome = worker.run(fm.Case("probe", "dense weights are the secret's bytes", files))
    assert outcome.status == "success" and "the explainer holds the secret's bytes" in " ".join(outcome.reads_outside)


def test_harness_reports_a_crash_with_its_signal_and_python_stack(worker):
    outcome = worker.request("segfault")
    assert outcome.failure and outcome.label == "crash SIGSEGV", outcome
    assert outcome.message == "Fatal Python error: Segmentation fault"
    assert re.fullmatch(r"ctypes/__init__\.py:\d+ string_at", outcome.where), outcome.where


def test_harness_reports_a_hang_with_its_python_stack(worker, sandbox):
    """A read of a FIFO that no one writes never returns."""
    sandbox.prepare(fm.Case("probe", "a FIFO", {}, {"pipe": "fifo"}))
    worker.timeout = 2
    try:
        outcome = worker.request("read", path=os.path.join(sandbox.case, "pipe"))
    finally:
        worker.timeout = CASE_TIMEOUT
    assert outcome.failure and outcome.label == "hang" and "_handle" in outcome.where, outcome


@pytest.mark.parametrize("family,examples", [("bytes", 200), ("proto-field", 200), ("external-data", 200)])
def test_mutated_model_files_convert_or_raise_typed_errors(worker, sandbox, family, examples):
    tally = fm.fuzz(worker, fm.family_cases(family, sandbox.secret), examples)
    assert tally.kinds == {family: examples}
    assert tally.failure_count == 0, tally.report_failures()


@pytest.mark.parametrize("field", fm.NOT_UTF8_FIELDS)
def test_strings_that_are_not_utf8_convert_or_raise_typed_errors(worker, field):
    """Protobuf's Python API hands such strings over as bytes, where every consumer expects str."""
    outcome = worker.run(fm.invalid_utf8_case(field))
    assert not outcome.failure, outcome


@pytest.mark.parametrize("op", ["If", "Loop"])
@pytest.mark.parametrize("depth", fm.NESTING_DEPTHS)
def test_deeply_nested_subgraphs_are_converted_or_refused_in_time(worker, op, depth):
    """Protobuf refuses more than 32 levels; within them every step must take time linear in the depth."""
    outcome = worker.run(fm.nested_case(op, depth))
    assert not outcome.failure, outcome


@pytest.mark.parametrize("attack", sorted(fm.ATTACKS))
def test_external_data_attack_is_refused_before_the_secret_is_read(worker, sandbox, attack):
    """UnsafeModelError from convert, no read of the secret, and the CLI's exit code 4 with no output."""
    outcome = worker.run(fm.attack_case(attack, sandbox.secret))
    assert outcome.label == "UnsafeModelError" and not outcome.reads_outside, outcome
    result = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "convert", sandbox.model, "-o", sandbox.explainer],
                            capture_output=True, text=True, cwd=sandbox.cwd)
    assert result.returncode == UNSAFE_EXIT_CODE, result.stderr
    assert result.stderr.startswith("lrp-onnx: error: ") and not os.path.exists(sandbox.explainer)


@pytest.mark.parametrize("special", fm.NOT_REGULAR)
def test_data_file_that_is_not_a_regular_file_is_refused_without_blocking(worker, special):
    """A FIFO blocks whoever opens it for reading until a writer comes: never, here."""
    outcome = worker.run(fm.not_regular_data_file_case(special))
    assert outcome.status == "typed" and issubclass(getattr(lrp_onnx, outcome.error), lrp_onnx.ModelLoadError), outcome

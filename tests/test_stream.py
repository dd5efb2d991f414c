"""Dataset-scale explain: streaming in bounded memory, relevance shards and the Parquet summary,
resuming a killed run, and what a folder left by another run does."""

import csv
import os
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pyarrow.parquet as pq

import lrp_onnx
from lrp_onnx.explain import explain_stream
from lrp_onnx.io.run_folder import SUMMARY_COLUMNS, RunFolder
from test_cli import ROOT, assert_bad_input, cli

CNN = os.path.join(ROOT, "models", "digits_cnn.onnx")
DIGITS = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))  # [10, 1, 8, 8]


def noisy_digits(count, seed=0):
    rng = np.random.default_rng(seed)
    return (DIGITS[np.arange(count) % 10] + rng.uniform(0, 0.2, (count, 1, 8, 8))).astype(np.float32)


def read_csv(folder):
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def relevance_of(folder, rows):
    return np.stack([np.load(os.path.join(folder, r["relevance_shard"]), mmap_mode="r")[int(r["relevance_row"])]
                     for r in rows])


def test_a_generator_of_inputs_is_explained_with_a_few_batches_alive():
    """Inputs are pulled as explanations are handed over: never more than the prefetch queues' few
    batches are alive, however many inputs the generator yields."""
    explainer = lrp_onnx.Explainer(CNN)
    batch, prefetch, count = 8, 2, 800
    alive, pulled, most_alive, most_ahead = [0], [0], 0, 0

    def inputs():
        for x in noisy_digits(count):
            alive[0] += 1
            x = x.copy()
            weakref.finalize(x, lambda: alive.__setitem__(0, alive[0] - 1))
            pulled[0] += 1
            yield x

    done = 0
    for outcome in explain_stream(explainer, inputs(), batch_size=batch, prefetch=prefetch):
        assert outcome.index == done and outcome.error is None and len(outcome.explanations) == 1
        done += 1
        del outcome  # no cycles hold the arrays: reference counting frees them here
        most_alive, most_ahead = max(most_alive, alive[0]), max(most_ahead, pulled[0] - done)
    assert done == count
    # queued and in-flight batches of both stages, and the one being handed over
    limit = (2 * (prefetch + 2) + 1) * batch
    assert most_alive <= limit and most_ahead <= limit, (most_alive, most_ahead)


def test_streamed_relevance_equals_one_batch_run():
    explainer = lrp_onnx.Explainer(CNN)
    x = noisy_digits(50)
    _, expected = explainer.explain(x)
    streamed = [o.explanations[0].relevance for o in explain_stream(explainer, list(x), batch_size=7)]
    np.testing.assert_allclose(np.stack(streamed), expected, rtol=1e-6, atol=1e-6)


def test_shards_and_parquet_are_readable_and_agree_with_the_csv(tmp_path):
    np.save(tmp_path / "digits.npy", noisy_digits(30))
    out = tmp_path / "out"
    result = cli("explain", CNN, tmp_path / "digits.npy", "-o", out, "--shard-size", "8", "--batch-size", "5",
                 "--top-k", "2", "--no-heatmaps")
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert len(rows) == 60 and [r["input"] for r in rows[:4]] == ["digits_0", "digits_0", "digits_1", "digits_1"]
    assert sorted(os.listdir(out / "relevance")) == [f"part-{i:05d}.npy" for i in range(4)]  # 8, 8, 8, 6 inputs
    assert np.load(out / "relevance" / "part-00003.npy").shape == (12, 1, 8, 8)
    assert not [f for f in os.listdir(out) if f.endswith(".png")]
    table = pq.read_table(out / "summary.parquet")
    assert table.column_names == list(SUMMARY_COLUMNS) and table.num_rows == 60
    assert table.column("target").to_pylist() == [int(r["target"]) for r in rows]
    relevance = relevance_of(out, rows)
    np.testing.assert_allclose(relevance.reshape(60, -1).sum(1), table.column("relevance_sum").to_numpy(), rtol=1e-5)
    _, expected = lrp_onnx.Explainer(CNN).explain(noisy_digits(30), table.column("target").to_numpy()[::2])
    np.testing.assert_allclose(relevance[::2], expected, rtol=1e-5, atol=1e-6)


def test_float16_relevance_halves_the_shards(tmp_path):
    np.save(tmp_path / "digits.npy", noisy_digits(20))
    folders = {dtype: tmp_path / dtype for dtype in ("float32", "float16")}
    for dtype, out in folders.items():
        assert cli("explain", CNN, tmp_path / "digits.npy", "-o", out, "--relevance-dtype", dtype).returncode == 0
    full, half = (np.load(folders[d] / "relevance" / "part-00000.npy") for d in ("float32", "float16"))
    assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
    np.testing.assert_allclose(half, full, rtol=1e-3, atol=1e-3 * np.abs(full).max())


def test_a_killed_run_continues_where_it_stopped(tmp_path):
    """SIGKILL halfway, then the same command: every input once, in order, as an uninterrupted run
    has them, and no temporary file left."""
    count = 12000
    np.save(tmp_path / "digits.npy", noisy_digits(count))
    args = [sys.executable, "-m", "lrp_onnx.cli", "explain", CNN, str(tmp_path / "digits.npy"), "--no-heatmaps",
            "--shard-size", "40", "--batch-size", "8"]
    out = tmp_path / "killed"
    run = subprocess.Popen(args + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (out / "parts" / "part-00003.json").exists():
        assert run.poll() is None, run.stderr.read()
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    # a part being written when the kill came is a temporary, not a committed part
    committed = len([f for f in os.listdir(out / "parts") if f.startswith("part-") and f.endswith(".json")])
    assert not (out / "summary.csv").exists() and 4 <= committed < count // 40, committed
    resumed = subprocess.run(args + ["-o", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed * 40} of them done by the run this one continued" in resumed.stdout
    fresh = tmp_path / "fresh"
    assert subprocess.run(args + ["-o", str(fresh)], capture_output=True).returncode == 0
    rows, expected = read_csv(out), read_csv(fresh)
    assert [r["input"] for r in rows] == [f"digits_{i}" for i in range(count)]
    assert rows == expected
    np.testing.assert_array_equal(relevance_of(out, rows), relevance_of(fresh, expected))
    leftovers = [f for d in (out, out / "parts", out / "relevance") for f in os.listdir(d) if f.endswith(".tmp")]
    assert leftovers == []


def test_a_folder_of_another_run_is_refused_unless_restarted(tmp_path):
    out = tmp_path / "out"
    assert cli("explain", CNN, os.path.join(ROOT, "models", "samples"), "-o", out).returncode == 0
    assert (out / "digit3_class3.png").exists()
    assert_bad_input(cli("explain", CNN, os.path.join(ROOT, "models", "samples"), "-o", out, "--composite", "epsilon"),
                     "holds a run with other settings (explainer)", "--restart", code=6)
    result = cli("explain", CNN, os.path.join(ROOT, "models", "samples", "digit1.png"), "-o", out, "--restart")
    assert result.returncode == 0, result.stderr
    assert [r["input"] for r in read_csv(out)] == ["digit1"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["digit1_class1.png"]


def test_inputs_that_changed_since_the_killed_run_are_refused(tmp_path):
    np.save(tmp_path / "digits.npy", noisy_digits(20))
    out = tmp_path / "out"
    assert cli("explain", CNN, tmp_path / "digits.npy", "-o", out, "--shard-size", "8").returncode == 0
    os.unlink(out / "parts" / "part-00002.json")  # as if killed before the last part
    np.save(tmp_path / "digits.npy", noisy_digits(4))
    assert_bad_input(cli("explain", CNN, tmp_path / "digits.npy", "-o", out, "--shard-size", "8"),
                     "not those of the run being continued", "digits.npy[4]")


def test_two_runs_cannot_write_one_folder(tmp_path):
    out = tmp_path / "out"
    holder = RunFolder(str(out), {"a": 1}, 8)
    try:
        assert_bad_input(cli("explain", CNN, os.path.join(ROOT, "models", "samples"), "-o", out),
                         "another lrp-onnx run is writing this folder", code=6)
    finally:
        holder.close(completed=False)
    assert not out.exists()  # the holder committed nothing, and made the folder


def test_without_pyarrow_the_summary_is_csv_and_nothing_fails(tmp_path):
    """pyarrow is an extra: where it cannot be imported, summary.parquet is left out, and said so."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['pyarrow'] = None; from lrp_onnx.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "explain", CNN, os.path.join(ROOT, "models", "samples"),
                             "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "summary.csv)" in result.stdout and not (out / "summary.parquet").exists()
    assert len(read_csv(out)) == 10

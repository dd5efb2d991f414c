"""explain on Ray Data: the same relevance as one process, bit for bit, and every input exactly
once when an actor is killed mid-run. Ray runs on this machine, started here (2 CPUs)."""

import csv
import os
import signal
import time

import numpy as np
import pytest

from conftest import extra_module

ray = extra_module("ray")

import lrp_onnx  # noqa: E402
from lrp_onnx.distributed import RayEngine, explain_dataset  # noqa: E402
from lrp_onnx.explain import explain_to_folder  # noqa: E402
from test_cli import ROOT  # noqa: E402
from test_stream import CNN, noisy_digits  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield
    ray.shutdown()


def test_a_dataset_of_arrays_gets_the_relevance_of_one_process():
    explainer = lrp_onnx.Explainer(CNN)
    x = noisy_digits(40)
    data = ray.data.from_items([{"image": row, "id": i} for i, row in enumerate(x)])
    out = explain_dataset(data, explainer, column="image", batch_size=6, workers=2).take_all()
    assert [row["id"] for row in out] == list(range(40))
    named = explainer.run(x)
    np.testing.assert_array_equal(np.stack([row["relevance"] for row in out]), named["relevance"])
    assert [row["explained_class"] for row in out] == named["explained_class"].tolist()
    assert all(row["error"] == "" for row in out)


def test_the_ray_engine_writes_the_files_of_the_local_engine(tmp_path):
    np.save(tmp_path / "digits.npy", noisy_digits(30))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    inputs = [str(tmp_path / "broken.png"), str(tmp_path / "digits.npy"), os.path.join(ROOT, "models", "samples")]
    explainer = lrp_onnx.Explainer(CNN)
    folders = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    for engine, folder in folders.items():
        totals, _ = explain_to_folder(explainer, inputs, str(folder), top_k=2, shard_inputs=16, batch_size=4,
                                      engine=RayEngine(workers=2) if engine == "ray" else None, progress=False)
        assert (totals.inputs, totals.failed, totals.explanations) == (41, 1, 80)
    local, distributed = folders["local"], folders["ray"]
    assert (local / "summary.csv").read_text() == (distributed / "summary.csv").read_text()
    for shard in sorted(os.listdir(local / "relevance")):
        assert (local / "relevance" / shard).read_bytes() == (distributed / "relevance" / shard).read_bytes()
    assert sorted(os.listdir(local)) == sorted(os.listdir(distributed))
    with open(distributed / "summary.csv") as f:
        assert "unreadable or corrupt image" in next(csv.DictReader(f))["error"]


def _actor_pids():
    """Processes of the explain actors, found by the name Ray gives them."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"MapBatches(ExplainBatches)" in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_a_killed_actor_is_restarted_and_no_input_is_lost_or_repeated():
    explainer = lrp_onnx.Explainer(CNN)
    count = 3000
    data = ray.data.from_items([{"image": row, "id": i} for i, row in enumerate(noisy_digits(count))])
    results = explain_dataset(data, explainer, column="image", batch_size=2, workers=2)
    seen, killed, after_kill = [], None, 0
    for batch in results.iter_batches(batch_size=2, batch_format="numpy"):
        seen.extend(batch["id"].tolist())
        if killed is None and len(seen) >= 100:
            deadline = time.monotonic() + 60  # the actors serve batches already: they exist, or the test fails
            while not _actor_pids() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _actor_pids(), "no explain actor found to kill"
            killed = _actor_pids()[0]
            os.kill(killed, signal.SIGKILL)
        elif killed is not None:
            after_kill += len(batch["id"])
    assert killed is not None and after_kill > 0
    assert sorted(seen) == list(range(count))  # every input once: none lost, none twice


def test_input_paths_are_read_on_the_workers_as_explain_reads_them():
    explainer = lrp_onnx.Explainer(CNN)
    rows = explain_dataset([os.path.join(ROOT, "models", "samples")], explainer, batch_size=3, workers=2).take_all()
    assert [row["name"] for row in rows] == [f"digit{d}" for d in range(10)]
    # the same batches as the workers ran: ONNX Runtime may round a batch of 1 otherwise than a batch of 3
    local = lrp_onnx.explain_images(explainer, os.path.join(ROOT, "models", "samples"), batch_size=3)
    np.testing.assert_array_equal(np.stack([row["relevance"] for row in rows]), np.stack([e.relevance for e in local]))
    assert [row["predicted"] for row in rows] == list(range(10))

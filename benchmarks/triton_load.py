"""Load test of an exported explainer on a real Triton Inference Server.

    python benchmarks/triton_load.py [--clients 8] [--requests 200] [--venv .triton-venv]

The server is the ``tritonserver`` binary that pip's nvidia-pytriton ships (Python backend only, no
ORT backend), installed in its own virtual environment with numpy<2 (the backend stub broke every
request under numpy 2) and onnxruntime:

    python3 -m venv .triton-venv && .triton-venv/bin/pip install "numpy<2" onnxruntime nvidia-pytriton

The bundled digits CNN is converted, exported with ``backend="python"`` and served from a
temporary model repository on 127.0.0.1. CLIENTS threads each send REQUESTS single-sample
requests (every other one with an explicit target, the rest leaving it to the server's -1), and
every response is compared with in-process ONNX Runtime. Prints latency percentiles, throughput,
errors and the server's statistics (inference count against execution count: fewer executions
than inferences means the dynamic batcher merged requests); writes benchmarks/out/triton_load.json.
"""

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
sys.path.insert(0, ROOT)

# the test command installs it there (README, CONTRIBUTING.md)
DEFAULT_VENV = os.environ.get("LRP_ONNX_TRITON_VENV", os.path.join(ROOT, ".triton-venv"))
MODEL = "digits_cnn"
# ONNX shape [N]; Triton's config gives them dims [1] with reshape [], so they come back as [N, 1]
SCALAR_OUTPUTS = ("explained_class", "explained_logit")
STARTUP_SECONDS = 60


def server_files(venv):
    """(tritonserver binary, pytriton's dist folder, its shared libraries, the venv's Python
    version) of a venv with nvidia-pytriton; None if there is none."""
    found = glob.glob(os.path.join(venv, "lib", "python3.*", "site-packages", "pytriton", "tritonserver", "bin",
                                   "tritonserver"))
    if not found:
        return None
    dist = os.path.dirname(os.path.dirname(found[0]))
    site = os.path.dirname(os.path.dirname(dist))
    version = os.path.basename(os.path.dirname(site))[len("python"):]
    return found[0], dist, os.path.join(site, "nvidia_pytriton.libs"), version


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tritonserver(repo, venv=DEFAULT_VENV):
    """Run pytriton's tritonserver on ``repo``, gRPC on 127.0.0.1 only; yields the gRPC URL once
    every model is ready, and stops the server on exit. Laid out as pytriton itself does: the
    backend folder holds the Python backend plus the stub built for the venv's Python, the
    wheel's bundled libraries go on LD_LIBRARY_PATH, and the venv's bin on PATH so that the stub
    runs that interpreter's packages (numpy<2, onnxruntime)."""
    import tritonclient.grpc as grpcclient

    files = server_files(venv)
    if files is None:
        raise FileNotFoundError(f"no nvidia-pytriton in {venv}")
    binary, dist, libs, version = files
    with tempfile.TemporaryDirectory(prefix="lrp-onnx-triton-") as work:
        backend = os.path.join(work, "backends", "python")
        shutil.copytree(os.path.join(dist, "backends", "python"), backend)
        shutil.copy(os.path.join(dist, "python_backend_stubs", version, "triton_python_backend_stub"), backend)
        env = dict(os.environ, LD_LIBRARY_PATH=libs, PATH=os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"])
        port = _free_port()
        log_path = os.path.join(work, "server.log")
        with open(log_path, "wb") as log:
            server = subprocess.Popen([binary, f"--model-repository={repo}", f"--backend-directory={work}/backends",
                                       "--allow-http=false", "--allow-metrics=false", "--grpc-address=127.0.0.1",
                                       f"--grpc-port={port}", "--exit-timeout-secs=10"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"127.0.0.1:{port}"
        try:
            client = grpcclient.InferenceServerClient(url)
            deadline = time.monotonic() + STARTUP_SECONDS
            while not _ready(client):
                if server.poll() is not None or time.monotonic() > deadline:
                    with open(log_path, errors="replace") as f:
                        tail = f.read()[-2000:]
                    raise RuntimeError(f"tritonserver did not become ready (exit {server.poll()}):\n{tail}")
                time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _ready(client):
    try:
        return client.is_server_ready()
    except Exception:  # the port is not open yet
        return False


def export_digits(repo):
    """The bundled digits CNN's explainer, exported for the Python backend into ``repo``."""
    from lrp_onnx import convert
    from lrp_onnx.triton import export_triton

    explainer = convert(os.path.join(ROOT, "models", "digits_cnn.onnx"))
    export_triton(explainer, repo, name=MODEL, backend="python")
    return os.path.join(repo, MODEL, "1", "model.onnx")


def request(client, image, target=None):
    """One inference; returns {output name: array} with Triton's [N, 1] per-sample scalars as [N]."""
    import tritonclient.grpc as grpcclient

    inputs = [grpcclient.InferInput("image", list(image.shape), "FP32")]
    inputs[0].set_data_from_numpy(image)
    if target is not None:
        inputs.append(grpcclient.InferInput("target", [len(target), 1], "INT64"))
        inputs[1].set_data_from_numpy(target.reshape(-1, 1))
    result = client.infer(MODEL, inputs)
    outputs = {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}
    return {name: value[:, 0] if name in SCALAR_OUTPUTS else value for name, value in outputs.items()}


def reference(session, image, target=None):
    """The same request on in-process ONNX Runtime."""
    target = np.full(len(image), -1, np.int64) if target is None else target
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image, "target": target})))


def largest_difference(got, want):
    """Largest absolute difference over every output; inf if an output is missing or misshapen."""
    if set(got) != set(want) or any(got[n].shape != want[n].shape for n in want):
        return float("inf")
    return max(float(np.max(np.abs(got[n].astype(np.float64) - want[n]))) for n in want)


def load_test(url, samples, clients, requests_per_client):
    """Each client thread sends its requests back to back. Returns the per-request records
    (latency, inputs, outputs or the error) and the wall time of the whole run."""
    import tritonclient.grpc as grpcclient

    records = [[] for _ in range(clients)]

    def client_loop(index):
        client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng(index)
        for i in range(requests_per_client):
            image = samples[rng.integers(len(samples))][None]
            target = rng.integers(10, size=1).astype(np.int64) if i % 2 else None
            start = time.perf_counter()
            try:
                outputs, error = request(client, image, target), None
            except Exception as e:
                outputs, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            records[index].append({"seconds": time.perf_counter() - start, "image": image, "target": target,
                                   "outputs": outputs, "error": error})

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in records for r in rs], time.perf_counter() - start


def model_statistics(url):
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="the virtual environment with nvidia-pytriton")
    args = parser.parse_args()
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    if server_files(args.venv) is None:
        raise SystemExit(f"no nvidia-pytriton in {args.venv}; install it as this file's docstring says")
    samples = np.load(os.path.join(ROOT, "models", "digits_samples.npy")).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="lrp-onnx-repo-") as repo:
        model_path = export_digits(repo)
        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        with tritonserver(repo, args.venv) as url:
            server_version = grpcclient.InferenceServerClient(url).get_server_metadata(as_json=True)["version"]
            request(grpcclient.InferenceServerClient(url), samples[:1])  # warm-up, not counted
            before = model_statistics(url)
            records, wall = load_test(url, samples, args.clients, args.requests)
            after = model_statistics(url)
    errors = [r["error"] for r in records if r["error"]]
    diffs = [largest_difference(r["outputs"], reference(session, r["image"], r["target"]))
             for r in records if not r["error"]]
    latency = np.array([r["seconds"] for r in records]) * 1e3
    inferences, executions = after[0] - before[0], after[1] - before[1]
    result = {
        "clients": args.clients, "requests_per_client": args.requests,
        "server": f"tritonserver {server_version} (nvidia-pytriton's build), Python backend hosting ONNX Runtime, "
                  "dynamic batching",
        "model": f"{MODEL} explainer (default composite), one sample per request",
        "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "max_abs_diff": max(diffs) if diffs else None,
        "latency_ms": {p: float(np.percentile(latency, int(p[1:]))) for p in ("p50", "p90", "p99")},
        "throughput_rps": len(records) / wall, "wall_seconds": wall,
        "inference_count": inferences, "execution_count": executions,
        "batching_merged_requests": executions < inferences,
        "mean_batch": inferences / executions if executions else None,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "triton_load.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    lat = result["latency_ms"]
    difference = f"{max(diffs):.1e}" if diffs else "n/a (no request succeeded)"
    print(f"{len(records)} requests ({args.clients} clients x {args.requests}), {len(errors)} errors, "
          f"max abs diff from in-process ORT {difference}")
    print(f"latency p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms; "
          f"throughput {result['throughput_rps']:.0f} requests/s")
    print(f"server statistics: {inferences} inferences in {executions} executions "
          f"(mean batch {inferences / max(executions, 1):.2f}: dynamic batching "
          f"{'merged requests' if result['batching_merged_requests'] else 'did not merge requests'})")
    print(f"wrote {os.path.relpath(os.path.join(OUT, 'triton_load.json'), ROOT)}")
    return 1 if errors or not diffs or max(diffs) > 1e-5 else 0


if __name__ == "__main__":
    sys.exit(main())

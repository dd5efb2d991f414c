"""The GPU cells of DEPLOYMENT.md: ONNX Runtime's CUDA provider and TensorRT (through polygraphy).

    pip install -e ".[test]" && pip uninstall -y onnxruntime && pip install onnxruntime-gpu tensorrt polygraphy
    python benchmarks/gpu.py [--repeats 20] [--only digits_cnn resnet18 ...]
    python benchmarks/deployment.py --render

For the same models, composites and feeds as benchmarks/deployment.py, each explainer runs on
ONNX Runtime's CPU provider (the reference), on its CUDA provider, and on TensorRT via
``polygraphy run --trt --onnxrt`` (polygraphy builds the engine with a profile for the batch and
compares TensorRT with ONNX Runtime itself; the relative L2 here is computed from the outputs it
saves, against the CPU reference). Explainers need no TensorRT plugin: MaxPool's backward has no
Indices output or scatter, and OneHot's depth is a constant. Writes benchmarks/out/gpu.json.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from deployment import BATCH, COMPOSITES, MODELS, OUT, explainer_file, model_file  # noqa: E402


def run_tensorrt(path, feeds, folder):
    """TensorRT's outputs and median milliseconds per batch, from polygraphy's run and log."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    inputs, outputs = os.path.join(folder, "inputs.json"), os.path.join(folder, "outputs.json")
    save_json([feeds], inputs)
    shapes = " ".join(f"{name}:{list(value.shape)}".replace(" ", "") for name, value in feeds.items())
    command = ["polygraphy", "run", path, "--trt", "--onnxrt", "--load-inputs", inputs, "--save-outputs", outputs,
               "--trt-min-shapes", shapes, "--trt-opt-shapes", shapes, "--trt-max-shapes", shapes,
               "--atol", "1e-4", "--rtol", "1e-3"]
    done = subprocess.run(command, capture_output=True, text=True)
    log = done.stdout + done.stderr
    results = RunResults.load(outputs) if os.path.exists(outputs) else None
    trt = next((runs for name, runs in (results or {}).items() if name.startswith("trt")), None) if results else None
    if not trt:
        raise RuntimeError(next((line for line in log.splitlines() if "ERROR" in line or "Error" in line),
                               f"polygraphy exited {done.returncode}").strip())
    times = [float(t) for t in re.findall(r"trt-runner.*?inference time.*?([\d.]+) ms", log, re.I)]
    return {name: np.asarray(trt[0][name]) for name in trt[0].keys()}, (np.median(times) if times else None), \
        done.returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", nargs="+", help="model names to measure")
    args = parser.parse_args()
    from lrp_onnx import runtimes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, exporter in [m for m in MODELS if not args.only or m[0] in args.only]:
            model = model_file(name, exporter, folder)
            for composite in COMPOSITES:
                path = explainer_file(model, composite, folder)
                feeds = runtimes.sample_feeds(path, batch=BATCH)
                reference = runtimes.run_ort(path, feeds, 0).outputs
                key = {"model": name, "exporter": exporter, "composite": composite}
                try:
                    run = runtimes.run_ort(path, feeds, args.repeats, provider="CUDAExecutionProvider")
                    rows.append({**key, "runtime": "ort-cuda", "status": "ran here", "ms": 1e3 * run.seconds / BATCH,
                                 **errors(run.outputs, reference)})
                except Exception as e:
                    rows.append({**key, "runtime": "ort-cuda", "status": "failed", "why": str(e).splitlines()[0]})
                try:
                    outputs, ms, polygraphy_passed = run_tensorrt(path, feeds, folder)
                    rows.append({**key, "runtime": "tensorrt", "status": "ran here",
                                 "ms": ms / BATCH if ms else float("nan"), "polygraphy_passed": polygraphy_passed,
                                 **errors(outputs, reference)})
                except Exception as e:
                    rows.append({**key, "runtime": "tensorrt", "status": "failed", "why": str(e).splitlines()[0]})
                print(rows[-2], rows[-1], sep="\n", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpu.json"), "w") as f:
        json.dump({"machine": gpu_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


def errors(outputs, reference):
    from lrp_onnx import runtimes
    return {name: runtimes.relative_l2(outputs[name], reference[name]) for name in ("relevance", "logits")}


def gpu_name():
    found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return f"{found.stdout.strip() or 'an NVIDIA GPU'} ({platform.machine()})"


if __name__ == "__main__":
    main()

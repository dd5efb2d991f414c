"""DEPLOYMENT.md: explainers on the runtimes people ship to, against ONNX Runtime for Python.

    python benchmarks/deployment.py [--repeats 3] [--only digits_cnn resnet18 ...]
    python benchmarks/deployment.py --render   # rewrite DEPLOYMENT.md from the saved results

For each model of the issue's matrix (the bundled digits CNN; random-init resnet18 at 64 px and
vgg11_bn at 224 px, both torch exporters) and composite (alpha-beta, epsilon-plus-flat), the
explainer runs on ONNX Runtime Python (CPU, the reference), on ONNX Runtime Python with graph
optimisations off (the floor: how far ORT moves from itself), on OpenVINO (f32), ONNX Runtime
Node and ONNX Runtime Web in headless Chromium, all on the same feeds (``runtimes.sample_feeds``,
a batch of 2). A cell is the relative L2 of the relevance (and of the logits) against the
reference and the median milliseconds per explanation (a run of the batch over 2).

The CPU results go to benchmarks/out/deployment.json. The GPU cells come from
benchmarks/out/gpu.json, which ``benchmarks/gpu.py`` writes on a machine with an NVIDIA GPU, and
the Triton figures from benchmarks/out/triton_load.json (``benchmarks/triton_load.py``); where a
file is missing, its cells say "not run" and why.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
sys.path.insert(0, os.path.join(ROOT, "tests"))

MODELS = [("digits_cnn", None), ("resnet18", "torchscript"), ("resnet18", "dynamo"), ("vgg11_bn", "torchscript"),
          ("vgg11_bn", "dynamo")]
COMPOSITES = ["alpha-beta", "epsilon-plus-flat"]
CPU_RUNTIMES = ["ort-unoptimised", "openvino", "ort-node", "ort-web"]
GPU_RUNTIMES = ["ort-cuda", "tensorrt"]
BATCH = 2
TOLERANCE = 1e-5


def model_file(name, exporter, folder):
    """The bundled digits CNN, or a random-init torchvision classifier exported into ``folder``."""
    if exporter is None:
        return os.path.join(ROOT, "models", f"{name}.onnx")
    import exporters
    path = os.path.join(folder, f"{name}-{exporter}.onnx")
    exporters.torchvision_classifier(name, path, exporter, batch=BATCH)
    return path


def explainer_file(model, composite, folder):
    import lrp_onnx
    path = os.path.join(folder, f"{os.path.basename(model)[:-5]}-{composite}.lrp.onnx")
    lrp_onnx.save_model(lrp_onnx.convert(model, composite), path)
    return path


def cell(model, exporter, composite, parity):
    row = {"model": model, "exporter": exporter, "composite": composite, "runtime": parity.runtime}
    if parity.failure is not None:
        return {**row, "status": "failed", "why": parity.failure}
    return {**row, "status": "ran here", "relevance": parity.errors.get("relevance"),
            "logits": parity.errors.get("logits"), "ms": 1e3 * parity.seconds / BATCH,
            "winner_flips": parity.winner_flips}


def measure(models, repeats):
    """Every CPU cell of the matrix, as a list of dicts (benchmarks/out/deployment.json's rows)."""
    from lrp_onnx import runtimes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, exporter in models:
            model = model_file(name, exporter, folder)
            for composite in COMPOSITES:
                path = explainer_file(model, composite, folder)
                reference, results = runtimes.check(path, CPU_RUNTIMES, repeats=repeats)
                itself = runtimes.Parity("ort", {"relevance": 0.0, "logits": 0.0}, reference.seconds)
                for parity in [itself, *results]:
                    rows.append(cell(name, exporter, composite, parity))
                    print(_line(rows[-1]), flush=True)
                for f in os.listdir(folder):
                    if f.startswith(os.path.basename(path)):
                        os.remove(os.path.join(folder, f))
    return rows


def _line(row):
    if row["status"] != "ran here":
        return f"{row['model']:10} {row['exporter'] or '':11} {row['composite']:17} {row['runtime']:15} {row['status']}: {row['why']}"
    return (f"{row['model']:10} {row['exporter'] or '':11} {row['composite']:17} {row['runtime']:15} "
            f"relevance {row['relevance']:.1e}  logits {row['logits']:.1e}  {row['ms']:8.1f} ms")


def load(name):
    path = os.path.join(OUT, name)
    return json.load(open(path)) if os.path.exists(path) else None


def render():
    cpu, gpu, triton = load("deployment.json"), load("gpu.json"), load("triton_load.json")
    if cpu is None:
        raise SystemExit("benchmarks/out/deployment.json is missing: run benchmarks/deployment.py first")
    rows = {(r["model"], r["exporter"], r["composite"], r["runtime"]): r for r in cpu["rows"]}
    gpu_note = None
    if gpu is None:
        gpu_note = "not run (no NVIDIA GPU here; `benchmarks/gpu.py` is ready)"
    else:
        rows.update({(r["model"], r["exporter"], r["composite"], r["runtime"]): r for r in gpu["rows"]})
    lines = ["# Deployment", "",
             "Generated by `python benchmarks/deployment.py` (do not edit by hand). Each explainer runs on "
             "the runtime named and on ONNX Runtime for Python (CPU, the reference) with the same feeds: a "
             f"batch of {BATCH}, standard-normal images, the predicted class explained. A cell gives the "
             "relative L2 of the relevance against the reference, then of the logits, then the median "
             "milliseconds per explanation (a batch run over the batch size), then where it ran. "
             "`ort-unoptimised` is ONNX Runtime with graph optimisations off: the floor, since fused and "
             f"unfused kernels round differently. The tests hold every runtime to {TOLERANCE:g}, with one "
             "exception explained below.", "",
             f"CPU cells: {cpu['machine']}; {cpu['versions']}; {cpu['date']}.", ""]
    runtimes = ["ort"] + CPU_RUNTIMES + GPU_RUNTIMES
    lines.append("| model | exporter | composite | " + " | ".join(runtimes) + " |")
    lines.append("|---|---|---|" + "---|" * len(runtimes))
    for name, exporter in MODELS:
        for composite in COMPOSITES:
            cells = []
            for runtime in runtimes:
                row = rows.get((name, exporter, composite, runtime))
                if row is None:
                    cells.append(gpu_note if runtime in GPU_RUNTIMES and gpu_note else "not run (not measured)")
                elif row["status"] != "ran here":
                    cells.append(f"{row['status']}: {row['why']}")
                elif runtime == "ort":
                    cells.append(f"reference; {row['ms']:.1f} ms; ran here")
                else:
                    flag = "" if row["relevance"] <= TOLERANCE else " **> 1e-5**"
                    if row.get("winner_flips"):
                        flag += f" ({row['winner_flips']} max-pool windows flipped)"
                    where = "ran here" if runtime in CPU_RUNTIMES else f"ran on {gpu['machine']}"
                    cells.append(f"{row['relevance']:.1e}{flag} / {row['logits']:.1e}; {row['ms']:.1f} ms; {where}")
            lines.append(f"| {name} | {exporter or 'bundled'} | {composite} | " + " | ".join(cells) + " |")
    lines += ["", NOTES, "", triton_section(triton)]
    with open(os.path.join(ROOT, "DEPLOYMENT.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


NOTES = """## What the figures say

- **vgg11_bn on OpenVINO and ONNX Runtime Web** are the cells past 1e-5. Their convolutions round
  differently from ONNX Runtime Python's (logits 1.3e-6 to 4.7e-6 apart; the input of the last max
  pool 1.4e-6 apart on OpenVINO), and in a few 2×2 windows of a max pool (2 of the 200,704 of
  features.21 on OpenVINO, torchscript, alpha-beta) the two largest inputs are nearer each other
  than that: the runtimes pick different winners, and that window's relevance lands on another
  pixel. Winner-take-all is discontinuous there, so no graph form removes it; `lrp-onnx check`
  counts such windows and says so next to DIFFERS. The tests accept a relevance difference past
  1e-5 only with at least one flipped window, the logits within 1e-5, and the relevance within
  1e-3. ONNX Runtime with its optimisations off stays within 3.4e-6 on the same cells.
- **OpenVINO** needs `INFERENCE_PRECISION_HINT=f32` on CPUs with bf16 units (its default there is
  bf16: relevance 1e-2 to 1.7e-1 off); `lrp-onnx check` sets it.
- **ONNX Runtime Web** needs explainers past 256 MiB saved with external data (a 515 MB single file
  fails with `std::bad_alloc`); `lrp-onnx convert` does that by default past 256 MiB.
- **MaxPool** has no `Indices` output and no scatter in its backward pass (TensorRT's parser does
  not take MaxPool's Indices). Measured against the earlier Indices + ScatterElements pass on
  ONNX Runtime CPU, 2 threads, epsilon-plus-flat at 224 px, batch 1 / 8: resnet18 71.8 → 76.1 ms /
  505.5 → 562.9 ms, vgg11_bn 264.6 → 300.7 ms / 1887 → 2106.5 ms (6–14 % slower: ORT's forward
  MaxPool got faster, its backward slower than the scatter; measured before the backward took each
  window's maximum over its views rather than from MaxPool's output, not re-measured since). Only
  the portable pass is kept."""


def triton_section(triton):
    head = "## Triton Inference Server\n\n"
    if triton is None:
        return head + ("Load test not run here (benchmarks/out/triton_load.json is missing): the Triton export "
                       "and its load test are not on this branch yet.")
    latency = triton["latency_ms"]
    return head + (f"{triton['clients']} clients × {triton['requests_per_client']} requests against "
                   f"{triton['server']}: {triton['errors']} errors, largest difference from in-process ONNX "
                   f"Runtime {triton['max_abs_diff']:.1e}; latency p50 {latency['p50']:.1f} ms, p90 "
                   f"{latency['p90']:.1f} ms, p99 {latency['p99']:.1f} ms; {triton['throughput_rps']:.0f} "
                   f"requests/s; {triton['inference_count']} inferences in {triton['execution_count']} "
                   f"executions (dynamic batching). Ran {triton['date']} on {triton['machine']}, clients "
                   "and server sharing the cores. The ORT-backend configuration (`--backend onnxruntime`) "
                   "passes Triton's schema check but has not been served: that server has no ORT backend.")


def versions():
    import onnxruntime
    import openvino
    return f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, " + ", ".join(
        f"{p} {json.load(open(os.path.join(ROOT, 'node_modules', p, 'package.json')))['version']}"
        for p in ("onnxruntime-node", "onnxruntime-web"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="model names to measure (the others keep their saved rows)")
    parser.add_argument("--render", action="store_true", help="only rewrite DEPLOYMENT.md from the saved results")
    args = parser.parse_args()
    if not args.render:
        models = [m for m in MODELS if not args.only or m[0] in args.only]
        rows = measure(models, args.repeats)
        saved = load("deployment.json") or {"rows": []}
        measured = {(r["model"], r["exporter"]) for r in rows}
        rows = [r for r in saved["rows"] if (r["model"], r["exporter"]) not in measured] + rows
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "deployment.json"), "w") as f:
            json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "versions": versions(),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    render()


if __name__ == "__main__":
    main()

"""Speed and memory of the explainer against the ORT forward pass and against Zennit.

    python benchmarks/bench.py [--models vgg16 resnet50] [--batches 1 8] [--repeats 5] [--threads 2]

For each torchvision model (random init, 224×224, dynamo export) and composite, in one process
and with the same thread count, the ORT forward pass (A), the explainer on ORT (B) and Zennit on
the same torch model with the same composite and canonizers (C) run interleaved A B C A B C...
*floor / forward* is the explainer's time times the share of its kernel time that its linear
passes (Conv, ConvTranspose, Gemm, MatMul) take, over the forward's: the least this graph shape
costs on ONNX Runtime, every other op being free.
Peak RSS of the explainer and of Zennit is measured in a subprocess each. Conversion runs as
`lrp-onnx convert` does (``convert_held`` then ``save_model``) in a fresh subprocess too, timed
from the call (imports aside) and with its peak RSS; the explainer file's size is recorded.
Prints the table and writes BENCHMARKS.md (the table, the machine and library versions, then
benchmarks/LEVERS.md), keeping the sections other scripts own (bench_transformers.py's).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from sections import marked_sections  # noqa: E402

COMPOSITES = ["alpha-beta", "epsilon-plus-flat"]


def session(path, threads, explainer=False):
    """The forward model with ORT's defaults; an explainer with lrp-onnx's session options."""
    import onnxruntime as ort

    from lrp_onnx.runtime import session_options
    if explainer:
        options = session_options(threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def torch_model(name, threads):
    import torch

    from zennit_reference import torchvision_model
    torch.set_num_threads(threads)
    return torchvision_model(name, 224)


def zennit_runner(model, name, composite, x):
    import torch

    from zennit_reference import zennit_composite, zennit_relevance
    tensor = torch.from_numpy(x)
    targets = np.zeros(len(x), np.int64)
    zc = zennit_composite(composite, name)
    return lambda: zennit_relevance(model, tensor, targets, zc)


def child_figures(args):
    """What a fresh ``rss_child`` subprocess prints: what it measured, then its peak RSS in MB."""
    result = subprocess.run([sys.executable, __file__, "--rss", *map(str, args)], capture_output=True, text=True,
                            check=True)
    return [float(v) for v in result.stdout.strip().splitlines()[-1].split()]


def peak_rss_mb(args):
    """Peak RSS of a fresh subprocess running one side of the comparison twice."""
    return child_figures(args)[-1]


def rss_child(kind, *args):
    printed = []
    if kind == "convert":  # as the CLI converts: the large weights go from memory to the file
        from lrp_onnx.emit import convert_held
        from lrp_onnx.runtime import save_model
        model, composite, out = args
        start = time.perf_counter()
        proto, held = convert_held(model, composite)
        save_model(proto, out, held=held)
        printed.append(time.perf_counter() - start)
    elif kind == "explainer":
        path, batch, threads = args[0], int(args[1]), int(args[2])
        s = session(path, threads, explainer=True)
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for _ in range(2):
            s.run(None, {"input": x, "target": np.full(batch, -1, np.int64)})
    else:
        name, composite, batch, threads = args[0], args[1], int(args[2]), int(args[3])
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        run = zennit_runner(torch_model(name, threads), name, composite, x)
        for _ in range(2):
            run()
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as f:
        printed.append(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024)
    print(*printed)


def model_bytes(path):
    """The model file plus the external data files it names (the dynamo exporter writes weights there)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), loc)) for loc in locations)


# Seconds of rest before each timed run. After a run, ONNX Runtime's and torch's worker threads
# spin-wait for more work; on 2 cores they took a core from whatever ran next (resnet50's ORT
# forward: 60 ms right after an explainer run, 39 ms after a rest).
REST_S = 0.25


def interleaved(runs, repeats):
    """Median seconds of each callable, run round-robin after one warm-up each, each after a rest."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, bucket in zip(runs, times):
            time.sleep(REST_S)
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# The explainer's linear passes: what its graph shape must compute whatever else is saved (ONNX
# Runtime's CPU provider names its fused and blocked-layout versions of them so too).
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def linear_share(path, feeds, threads, runs=3):
    """Share of the explainer's kernel time that its linear passes take, from ONNX Runtime's
    profiler over ``runs`` runs after a warm-up. Times the explainer's measured time, it is the
    floor of the graph shape: the explainer with every other op free."""
    import json

    import onnxruntime as ort

    from lrp_onnx.runtime import session_options
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    profiled = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        profiled.run(None, feeds)
    trace = profiled.end_profiling()
    with open(trace) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    os.remove(trace)
    # the warm-up's events are the first 1/(runs+1); every run has the same nodes
    events = events[len(events) // (runs + 1):]
    total = sum(e["dur"] for e in events)
    return sum(e["dur"] for e in events if e["args"]["op_name"] in LINEAR_OPS) / total


def bench_model(name, batches, repeats, threads, workdir):
    import torch

    from zennit_reference import export
    model = torch_model(name, threads)
    path = export(model, torch.randn(2, 3, 224, 224), os.path.join(workdir, f"{name}.onnx"), dynamo=True)
    forward = session(path, threads)
    rows = []
    for composite in COMPOSITES:
        explainer_path = os.path.join(workdir, f"{name}-{composite}.lrp.onnx")
        convert_s, convert_mb = child_figures(["convert", path, composite, explainer_path])
        explainer = session(explainer_path, threads, explainer=True)
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            target = np.full(batch, -1, np.int64)
            t_forward, t_explainer, t_zennit = interleaved([
                lambda: forward.run(None, {"input": x}),
                lambda: explainer.run(None, {"input": x, "target": target}),
                zennit_runner(model, name, composite, x)], repeats)
            rows.append({
                "model": name, "batch": batch, "composite": composite, "forward": t_forward,
                "explainer": t_explainer, "zennit": t_zennit,
                "floor": t_explainer * linear_share(explainer_path, {"input": x, "target": target}, threads),
                "rss_explainer": peak_rss_mb(["explainer", explainer_path, batch, threads]),
                "rss_zennit": peak_rss_mb(["zennit", name, composite, batch, threads]),
                "convert": convert_s, "rss_convert": convert_mb, "size_ratio": model_bytes(explainer_path) / model_bytes(path)})
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| model | batch | composite | ORT forward (s) | explainer (s) | Zennit (s) | explainer / forward | "
          "floor / forward | Zennit / explainer | peak RSS explainer (MB) | peak RSS Zennit (MB) | convert (s) | "
          "peak RSS convert (MB) | file size / model |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    return (f"| {r['model']} | {r['batch']} | {r['composite']} | {r['forward']:.3f} | {r['explainer']:.3f} | "
            f"{r['zennit']:.3f} | {r['explainer'] / r['forward']:.2f} | {r['floor'] / r['forward']:.2f} | "
            f"{r['zennit'] / r['explainer']:.2f} | "
            f"{r['rss_explainer']:.0f} | {r['rss_zennit']:.0f} | {r['convert']:.2f} | {r['rss_convert']:.0f} | {r['size_ratio']:.3f} |")


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(threads, repeats, models="random-init torchvision models, 224×224, dynamo export; peak RSS in a "
                "fresh subprocess each", script="benchmarks/bench.py",
                reference="zennit 0.5.1"):
    import onnxruntime
    import torch

    import lrp_onnx
    return (f"- Machine: {cpu_name()}, {os.cpu_count()} cores; {threads} threads for ORT (intra-op) and torch\n"
            f"- Versions: lrp-onnx {lrp_onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"torch {torch.__version__}, {reference}, numpy {np.__version__}, Python {platform.python_version()}\n"
            f"- Medians of {repeats} interleaved runs after one warm-up, each after {REST_S} s of rest (so that no "
            f"runtime's spinning worker threads slow the next); {models}\n"
            f"- Generated by `python {script}` on {time.strftime('%Y-%m-%d')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--rss", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        return rss_child(*args.rss)
    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows += bench_model(name, args.batches, args.repeats, args.threads, workdir)
    levers = open(os.path.join(HERE, "LEVERS.md")).read()
    text = "\n".join(["# Benchmarks", "", environment(args.threads, args.repeats), "", HEADER,
                      *map(format_row, rows), "", levers])
    kept = marked_sections(args.output)  # other scripts' sections (bench_transformers.py)
    with open(args.output, "w") as f:
        f.write(text.rstrip("\n") + "".join("\n\n" + block for block in kept) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

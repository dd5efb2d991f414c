"""Dataset-scale explain: inputs per second and peak memory, one process against Ray Data.

    python benchmarks/scale.py [--models digits resnet50] [--counts 1000 10000] [--engines local ray:1 ray:2]
                               [--rss-counts 100 1000 10000]

Synthetic PNG images (seeded noise) in a temporary folder: 8×8 grey for the bundled digits CNN,
224×224 RGB for a random-init torchvision resnet50 (dynamo export, converted once to an
alpha-beta explainer). Each cell is one `lrp-onnx explain ... --no-heatmaps` command, timed from
start to exit (Ray's start-up included; the 1-input row gives the fixed cost). Peak memory is the
largest sum, sampled every 50 ms, of the resident memory of the command's processes and of the
Ray actors. Writes SCALE.md.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SIDES = {"digits": (8, "L"), "resnet50": (224, "RGB")}


def make_images(folder, count, side, mode, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side, channels), np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(os.path.join(folder, f"{i:06d}.png"))
    return folder


def explainer_path(name, workdir):
    if name == "digits":
        return os.path.join(ROOT, "models", "digits_cnn.onnx")
    import torch

    import lrp_onnx
    from exporters import export_torch
    from zennit_reference import torchvision_model
    path = os.path.join(workdir, f"{name}.onnx")
    export_torch(torchvision_model(name, 224), torch.zeros(1, 3, 224, 224), path, "dynamo")
    out = os.path.join(workdir, f"{name}.lrp.onnx")
    lrp_onnx.save_model(lrp_onnx.convert(path), out)
    return out


def _tree_rss(root_pid):
    """Resident MiB of ``root_pid``, its descendants, and every Ray actor that explains."""
    parents, rss, explains = {}, {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/status") as f:
                rss[int(pid)] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ExplainBatches" in f.read():
                    explains.add(int(pid))
        except (OSError, StopIteration, ValueError):
            continue
    tree, grown = {root_pid}, True
    while grown:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return sum(rss.get(p, 0) for p in tree | explains)


def run_cell(explainer, images, engine, workdir):
    """(seconds, peak MiB) of one explain command; the cores are shared among its workers."""
    out = tempfile.mkdtemp(dir=workdir)
    workers = int(engine.split(":")[1]) if engine.startswith("ray") else 1
    threads = max(1, os.cpu_count() // workers)
    command = [sys.executable, "-m", "lrp_onnx.cli", "explain", explainer, images, "-o", out, "--no-heatmaps",
               "--threads", str(threads)]
    if engine.startswith("ray"):
        command += ["--engine", "ray", "--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.decode()[-2000:]}")
    subprocess.run(["rm", "-rf", out], check=True)
    return seconds, peak[0]


def environment():
    import onnxruntime

    import lrp_onnx
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"- Machine: {cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} "
            f"GiB\n- Versions: lrp-onnx {lrp_onnx.__version__}, onnxruntime {onnxruntime.__version__}, ray {ray_version}, "
            f"Python {platform.python_version()}\n- Generated by `python benchmarks/scale.py` on {time.strftime('%Y-%m-%d')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet50"], choices=sorted(SIDES))
    parser.add_argument("--counts", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--rss-counts", nargs="+", type=int, default=[100, 1000, 10000],
                        help="input counts of the memory-against-count rows (local engine)")
    parser.add_argument("--engines", nargs="+", default=["local", "ray:1", "ray:2"])
    parser.add_argument("--limit", nargs="+", default=[], metavar="MODEL=N",
                        help="run MODEL on at most N inputs (counts above N are left out for it)")
    parser.add_argument("--output", default=os.path.join(ROOT, "SCALE.md"))
    args = parser.parse_args()
    limits = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    rows, memory = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            explainer = explainer_path(name, workdir)
            side, mode = SIDES[name]
            fits = [n for n in args.counts if n <= limits.get(name, n)]
            rss_counts = [n for n in args.rss_counts if n <= limits.get(name, n)]
            counts = sorted(set(fits) | set(rss_counts) | {1})
            images = {n: make_images(os.path.join(workdir, f"{name}-{n}"), n, side, mode) for n in counts}
            for n in sorted(set(fits) | {1}):
                for engine in args.engines:
                    seconds, peak = run_cell(explainer, images[n], engine, workdir)
                    rows.append((name, n, engine, seconds, n / seconds, peak))
                    print(f"{name} {n:>6} {engine:<6} {seconds:8.1f} s {n / seconds:8.1f} inputs/s {peak:7.0f} MiB",
                          flush=True)
            for n in rss_counts:  # a local cell of the same count above is reused
                seconds, peak = next(((s, p) for m, c, e, s, _, p in rows if (m, c, e) == (name, n, "local")), (None, None))
                if seconds is None:
                    seconds, peak = run_cell(explainer, images[n], "local", workdir)
                memory.append((name, n, seconds, peak))
                print(f"{name} {n:>6} local peak {peak:7.0f} MiB", flush=True)
            for n in counts:
                subprocess.run(["rm", "-rf", images[n]], check=True)
    lines = ["# Dataset-scale explain", "", environment(),
             f"- The {os.cpu_count()} cores shared out: ONNX Runtime threads = cores / workers (local: one worker); "
             "batch 32; `--no-heatmaps`; "
             "synthetic PNG inputs; whole-command wall time (start-up included)", "",
             "| model | inputs | engine | seconds | inputs/s | inputs/s after start-up | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    # the 1-input cell of the same model and engine is the fixed cost (start-up, loading, Ray);
    # the rate past it is given where the run took at least twice as long, as noise swamps it below
    fixed = {(m, e): s for m, n, e, s, _, _ in rows if n == 1}

    def steady(m, n, e, s):
        return f"{(n - 1) / (s - fixed[m, e]):.1f}" if n > 1 and s >= 2 * fixed[m, e] else "–"
    lines += [f"| {m} | {n} | {e} | {s:.1f} | {r:.1f} | {steady(m, n, e, s)} | {p:.0f} |" for m, n, e, s, r, p in rows]
    lines += ["", "Peak memory against the number of inputs (local engine):", "",
              "| model | inputs | seconds | peak MiB |", "|---|---|---|---|"]
    lines += [f"| {m} | {n} | {s:.1f} | {p:.0f} |" for m, n, s, p in memory]
    kept = ""
    if os.path.exists(args.output):  # the hand-written notes below the generated tables
        text = open(args.output).read()
        marker = "\n## On a cluster"
        kept = text[text.index(marker):] if marker in text else ""
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n" + kept)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

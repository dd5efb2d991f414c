"""Dataset-scale explain: inputs per second and peak memory, one process against Ray Data; and
evaluate's peak memory.

    python benchmarks/scale.py [--models digits resnet50] [--counts 1000 10000] [--engines local ray:1 ray:2]
                               [--rss-counts 100 1000 10000] [--evaluate-counts 100 1000 10000]

Synthetic PNG images (seeded noise) in a temporary folder: 8×8 grey for the bundled digits CNN,
224×224 RGB for a random-init torchvision resnet50 (dynamo export, converted once to an
alpha-beta explainer). Each cell is one `lrp-onnx explain ... --no-heatmaps` command, timed from
start to exit (Ray's start-up included; the 1-input row gives the fixed cost). Peak memory is the
largest sum, sampled every 50 ms, of the resident memory of the command's processes and of the
Ray actors. The evaluate rows run `lrp-onnx evaluate` on the digits the same way. Writes
SCALE.md; rows of an earlier SCALE.md that this run did not measure are kept, with the day and
the CPU they were measured on, so a long sweep can be run a part at a time (and rows from two
machines are told apart). The resident sums count pages that processes share (Ray's object store)
once per process, so Ray's peaks are upper bounds.
"""

import argparse
import os
import platform
import re
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
sys.path.insert(0, HERE)

from bench import cpu_name  # noqa: E402

SIDES = {"digits": (8, "L"), "resnet50": (224, "RGB")}
EVALUATE_STEPS = 8


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


def explain_command(explainer, images, engine, out):
    """``lrp-onnx explain`` on ``engine``; the cores are shared among its workers."""
    workers = int(engine.split(":")[1]) if engine.startswith("ray") else 1
    threads = max(1, os.cpu_count() // workers)
    command = [sys.executable, "-m", "lrp_onnx.cli", "explain", explainer, images, "-o", out, "--no-heatmaps",
               "--threads", str(threads)]
    return command + (["--engine", "ray", "--workers", str(workers)] if engine.startswith("ray") else [])


def evaluate_command(model, images, out):
    """``lrp-onnx evaluate``: alpha-beta against random, EVALUATE_STEPS regions flipped per input."""
    return [sys.executable, "-m", "lrp_onnx.cli", "evaluate", model, images, "-o", out, "--method", "lrp:alpha-beta",
            "--steps", str(EVALUATE_STEPS)]


def run_cell(command_for, workdir):
    """(seconds, peak MiB) of the command ``command_for(output folder)``."""
    out = tempfile.mkdtemp(dir=workdir)
    command = command_for(out)
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
    return (f"- Machine of the last run: {cpu_name()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} "
            f"GiB\n- Versions: lrp-onnx {lrp_onnx.__version__}, onnxruntime {onnxruntime.__version__}, ray {ray_version}, "
            f"Python {platform.python_version()}\n- Generated by `python benchmarks/scale.py`, last run on {time.strftime('%Y-%m-%d')}; "
            "each row gives the day and the CPU it was measured on")


TABLE_ROW = re.compile(r"^\| (digits|resnet50) \| (\d+) \|(.*)\|$")


def earlier_rows(path):
    """(speed rows, memory rows) of an earlier SCALE.md, as main() builds them; a row from before
    the day column takes the file's date."""
    if not os.path.exists(path):
        return [], []
    text = open(path).read()
    generated = re.search(r"on (\d{4}-\d{2}-\d{2})", text)
    speed, memory = [], []
    for line in text.splitlines():
        match = TABLE_ROW.match(line)
        if not match:
            continue
        model, count = match.group(1), int(match.group(2))
        cells = [c.strip() for c in match.group(3).split("|")]
        if not re.match(r"\d{4}-", cells[-1]):
            cells.append(generated.group(1) if generated else "?")
        if cells[0].startswith(("local", "ray")):  # engine, seconds, inputs/s, after start-up, MiB, day
            speed.append((model, count, cells[0], float(cells[1]), float(cells[2]), cells[3], float(cells[4]),
                          cells[5]))
        else:  # command (explain before the column), seconds, MiB, day
            if not cells[0].startswith(("explain", "evaluate")):
                cells.insert(0, "explain")
            memory.append((model, count, cells[0], float(cells[1]), float(cells[2]), cells[3]))
    return speed, memory


def after_start_up(count, seconds, fixed):
    """Inputs per second past the fixed cost of the same run's 1-input cell, where the run took at
    least twice as long (below that, noise swamps it)."""
    return f"{(count - 1) / (seconds - fixed):.1f}" if count > 1 and seconds >= 2 * fixed else "–"


def merged(earlier, measured, key_length):
    """The measured rows, and the earlier ones whose key (the first ``key_length`` cells) was not measured."""
    keys = {row[:key_length] for row in measured}
    return sorted([row for row in earlier if row[:key_length] not in keys] + measured, key=lambda r: r[:key_length])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet50"], choices=sorted(SIDES))
    parser.add_argument("--counts", nargs="*", type=int, default=[1000, 10000])
    parser.add_argument("--rss-counts", nargs="*", type=int, default=[100, 1000, 10000],
                        help="input counts of the memory-against-count rows (local engine)")
    parser.add_argument("--evaluate-counts", nargs="*", type=int, default=[100, 1000, 10000],
                        help=f"input counts of the evaluate memory rows (digits only: lrp:alpha-beta and random, "
                             f"L = {EVALUATE_STEPS})")
    parser.add_argument("--engines", nargs="+", default=["local", "ray:1", "ray:2"])
    parser.add_argument("--limit", nargs="+", default=[], metavar="MODEL=N",
                        help="run MODEL on at most N inputs (counts above N are left out for it)")
    parser.add_argument("--output", default=os.path.join(ROOT, "SCALE.md"))
    args = parser.parse_args()
    limits = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    # a part of a sweep run elsewhere must not pass for this machine's
    rows, memory, today = [], [], f"{time.strftime('%Y-%m-%d')}, {cpu_name()}"
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            explainer = explainer_path(name, workdir)
            side, mode = SIDES[name]
            fits = [n for n in args.counts if n <= limits.get(name, n)]
            rss_counts = [n for n in args.rss_counts if n <= limits.get(name, n)]
            evaluate_counts = args.evaluate_counts if name == "digits" else []
            counts = sorted(set(fits) | set(rss_counts) | set(evaluate_counts) | {1})
            images = {n: make_images(os.path.join(workdir, f"{name}-{n}"), n, side, mode) for n in counts}
            fixed = {}  # per engine: the 1-input cell's seconds, the fixed cost (start-up, loading, Ray)
            for n in sorted(set(fits) | {1}) if fits else []:
                for engine in args.engines:
                    seconds, peak = run_cell(lambda out: explain_command(explainer, images[n], engine, out), workdir)
                    fixed.setdefault(engine, seconds)
                    rows.append((name, n, engine, seconds, n / seconds, after_start_up(n, seconds, fixed[engine]),
                                 peak, today))
                    print(f"{name} {n:>6} {engine:<6} {seconds:8.1f} s {n / seconds:8.1f} inputs/s {peak:7.0f} MiB",
                          flush=True)
            for n in rss_counts:  # a local cell of the same count above is reused
                seconds, peak = next(((s, p) for m, c, e, s, _, _, p, _ in rows if (m, c, e) == (name, n, "local")),
                                     (None, None))
                if seconds is None:
                    seconds, peak = run_cell(lambda out: explain_command(explainer, images[n], "local", out), workdir)
                memory.append((name, n, "explain", seconds, peak, today))
                print(f"{name} {n:>6} explain peak {peak:7.0f} MiB", flush=True)
            for n in evaluate_counts:
                seconds, peak = run_cell(lambda out: evaluate_command(explainer, images[n], out), workdir)
                memory.append((name, n, "evaluate", seconds, peak, today))
                print(f"{name} {n:>6} evaluate {seconds:8.1f} s peak {peak:7.0f} MiB", flush=True)
            for n in counts:
                subprocess.run(["rm", "-rf", images[n]], check=True)
    earlier_speed, earlier_memory = earlier_rows(args.output)
    rows, memory = merged(earlier_speed, rows, 3), merged(earlier_memory, memory, 3)
    lines = ["# Dataset-scale explain", "", environment(),
             f"- The {os.cpu_count()} cores shared out: ONNX Runtime threads = cores / workers (local: one worker); "
             "batch 32; `--no-heatmaps`; "
             "synthetic PNG inputs; whole-command wall time (start-up included)", "",
             "| model | inputs | engine | seconds | inputs/s | inputs/s after start-up | peak MiB | measured |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {e} | {s:.1f} | {r:.1f} | {steady} | {p:.0f} | {d} |"
              for m, n, e, s, r, steady, p, d in rows]
    lines += ["", "Peak memory against the number of inputs, one process (`explain` as above; `evaluate` "
              f"with `--method lrp:alpha-beta --steps {EVALUATE_STEPS}`, random added, perturbed copies scored "
              "in batches of 256):", "",
              "| model | inputs | command | seconds | peak MiB | measured |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {n} | {c} | {s:.1f} | {p:.0f} | {d} |" for m, n, c, s, p, d in memory]
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

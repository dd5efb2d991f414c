"""Fuzz the loader for a while and record the figures in RELIABILITY.md (issue 7).

    python benchmarks/fuzz_loader.py                      # 5000 executions
    python benchmarks/fuzz_loader.py --minutes 15         # as many as 15 minutes allow
    python benchmarks/fuzz_loader.py --executions 300 --no-write

Every execution converts one mutated model file in a persistent worker subprocess
(tests/fuzz_models.py holds the seeds, the mutations, the worker and the read detection). First
the explicit cases run once (``fuzz_models.explicit_cases``): each external-data attack, If/Loop
nesting at depths 24, 50, 100 and 200, and a data file that is a FIFO or a directory. Then
batches of cases drawn by hypothesis from every mutation family (bytes, protobuf fields,
external-data entries), each batch with its own seed, until the executions or the minutes run
out. The report lists executions by mutation kind, outcomes, and every failure (untyped
exception, crash, hang, read outside the model's folder) grouped by the lrp_onnx line it comes
from (``fuzz_models.Tally``), each with the shortest reproducer seen. It is printed, and written
as the fuzz-loader section of RELIABILITY.md (benchmarks/sections.py: the other sections stay).
"""

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import onnx
import onnxruntime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fuzz_models as fm  # noqa: E402
from sections import RELIABILITY, write_section  # noqa: E402

SECTION = "fuzz-loader"
BATCH = 100  # cases per hypothesis run: the granularity of --minutes


def machine():
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")


def code_version():
    """The commit, and whether lrp_onnx/ differs from it (the converter under test)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("log", "-1", "--format=%h %s")
    return commit + (" (plus uncommitted changes in lrp_onnx/)" if git("status", "--porcelain", "lrp_onnx") else "")


def run(args, sandbox):
    """The Tally of the explicit cases, then of hypothesis batches until the budget is spent."""
    tally = fm.Tally()
    started = time.monotonic()
    with fm.Worker(sandbox, timeout=args.timeout) as worker:
        for case in fm.explicit_cases(sandbox.secret):
            tally.add(case, worker.run(case))
        batch = 0
        while True:
            elapsed = time.monotonic() - started
            left = args.executions - tally.executions if args.minutes is None else None
            if (left is not None and left <= 0) or (args.minutes is not None and elapsed > args.minutes * 60):
                break
            size = BATCH if left is None else min(BATCH, left)
            tally.merge(fm.fuzz(worker, fm.all_cases(sandbox.secret), size, seed=args.seed + batch))
            batch += 1
            print(f"  {tally.executions} executions, {tally.failure_count} failures, {elapsed / 60:.1f} min",
                  file=sys.stderr)
        return tally, time.monotonic() - started, worker


def markdown(tally, seconds, worker, header):
    others = sorted(label for label in tally.outcomes if label.startswith(("untyped", "crash")))
    typed = [label for label, _ in tally.outcomes.most_common() if label not in ("success", "hang", *others)]
    lines = [
        "## Fuzzing the loader",
        "",
        header + f" Read detection: {'strace' if worker.strace else 'audit hook'}.",
        "",
        f"**{tally.executions} executions** in {seconds / 60:.1f} min ({tally.executions / seconds:.1f}/s), "
        f"{worker.starts} worker start(s); **{tally.failure_count} failures** in {len(tally.findings)} group(s).",
        "",
        "| mutation kind | executions |",
        "|---|---:|",
        *(f"| {kind} | {count} |" for kind, count in sorted(tally.kinds.items())),
        "",
        "| outcome | executions |",
        "|---|---:|",
        f"| success | {tally.outcomes['success']} |",
        *(f"| typed: {label} | {tally.outcomes[label]} |" for label in typed),
        f"| untyped exception | {sum(n for label, n in tally.outcomes.items() if label.startswith('untyped'))} |",
        f"| crash | {sum(n for label, n in tally.outcomes.items() if label.startswith('crash'))} |",
        f"| hang (no answer in {worker.timeout:g} s) | {tally.outcomes['hang']} |",
        f"| read outside the model's folder (any outcome) | {tally.reads_outside} |",
        "",
    ]
    if others:
        lines += ["Untyped exceptions and crashes by class: " +
                  ", ".join(f"{label} ×{tally.outcomes[label]}" for label in others) + ".", ""]
    lines += ["### Findings", ""]
    if tally.findings:
        lines += ["| count | outcome | message | shortest reproducer |", "|---:|---|---|---|"]
        lines += [f"| {f.count} | {f.label} | {_cell(f.message)}{f' (at {_cell(f.where)})' if f.where else ''} | "
                  f"{f.kind}: {_cell(f.description)} |" for f in tally.failures()]
    else:
        lines.append("None.")
    lines += ["", "### How reads outside are detected", "", fm.DETECTION,
              "- A data file that is a FIFO is an explicit case only: each one that blocks costs a whole timeout."]
    return "\n".join(lines) + "\n"


def _cell(text):
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executions", type=int, default=5000, help="executions in all, the explicit cases included")
    parser.add_argument("--minutes", type=float, help="run batches for this long instead of --executions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch i uses seed + i")
    parser.add_argument("--timeout", type=float, default=10,
                        help="seconds a case may take before it is a hang (a case takes about 0.05 s)")
    parser.add_argument("--no-write", action="store_true", help="print the report without writing RELIABILITY.md")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    # Taken before the worker imports lrp_onnx: the code under test, even if a commit lands meanwhile.
    header = (f"`{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}.\n"
              f"Code: {code_version()}.")
    print(header, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lrp-fuzz-") as root:
        tally, seconds, worker = run(args, fm.Sandbox(root))
    section = markdown(tally, seconds, worker, header)
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
        print(f"wrote the {SECTION} section of {RELIABILITY}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Parity with Zennit at a chosen input size (default 224×224, the size the closing notes quote).

    python benchmarks/parity.py [--size 224] [--models vgg16 resnet50 ...]

Prints a markdown table of the per-sample relative L2 error of lrp-onnx against Zennit for each
model × exporter × composite, and writes it to benchmarks/out/parity-<size>.md.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from test_parity import COMPOSITES, EXPORTERS, MODELS  # noqa: E402
from zennit_reference import parity_errors  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--epsilon", type=float, default=1e-6)
    args = parser.parse_args()
    lines = [f"Relative L2 error of lrp-onnx against Zennit, {args.size}×{args.size}, batch 2 (max over samples)",
             "", "| model | exporter | " + " | ".join(COMPOSITES) + " |", "|---|---|" + "---|" * len(COMPOSITES)]
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            start = time.time()
            errors = parity_errors(model, args.size, COMPOSITES, EXPORTERS, workdir, args.epsilon)
            for exporter in EXPORTERS:
                cells = " | ".join(f"{errors[exporter, c].max():.1e}" for c in COMPOSITES)
                lines.append(f"| {model} | {exporter} | {cells} |")
            print(f"{model}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", f"parity-{args.size}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()

"""Parity with Zennit at a chosen input size (default 224×224, the size the closing notes quote).

    python benchmarks/parity.py [--size 224] [--models vgg16 resnet50 ...]

Prints a markdown table of the per-sample relative L2 error of lrp-onnx against Zennit for each
model × exporter × composite, and writes it to benchmarks/out/parity-<size>.md.

``--conditioning COMPOSITE`` adds a second table for that composite: Zennit in float32 and lrp-onnx
(TorchScript export), each against Zennit in float64. Where float32 Zennit itself is far from
float64 (the ε-rule with a tiny ε on deep nets), the problem, not the converter, limits parity.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from test_parity import COMPOSITES, EXPORTERS, MODELS  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lrp_onnx  # noqa: E402
from zennit_reference import (distinct_targets, export, our_params, parity_errors, relative_errors,  # noqa: E402
                              torchvision_model, zennit_composite, zennit_relevance)


def conditioning(model_name, size, composite, workdir):
    """(Zennit float32 vs float64, lrp-onnx vs Zennit float64), max over the two samples."""
    model = torchvision_model(model_name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = distinct_targets(model(x).numpy())
    ref32 = zennit_relevance(model, x, targets, zennit_composite(composite, model_name))
    ref64 = zennit_relevance(torchvision_model(model_name, size).double(), x.double(), targets,
                             zennit_composite(composite, model_name)).astype(np.float64)
    path = export(model, x, os.path.join(workdir, f"{model_name}-cond.onnx"), dynamo=False)
    _, ours = lrp_onnx.Explainer(path, composite=composite, **our_params(composite)).explain(x.numpy(), targets)
    os.remove(path)
    return relative_errors(ref32, ref64).max(), relative_errors(ours, ref64).max()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--epsilon", type=float, default=1e-6)
    parser.add_argument("--conditioning", metavar="COMPOSITE", help="also compare both against Zennit in float64")
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
        if args.conditioning:
            lines += ["", f"{args.conditioning}: relative L2 error against Zennit in float64", "",
                      "| model | Zennit float32 | lrp-onnx (ORT float32) |", "|---|---|---|"]
            for model in args.models:
                z32, ours = conditioning(model, args.size, args.conditioning, workdir)
                lines.append(f"| {model} | {z32:.1e} | {ours:.1e} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", f"parity-{args.size}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()

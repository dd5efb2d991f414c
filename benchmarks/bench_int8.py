"""Speed of quantized (int8) models and their explainers: BENCHMARKS.md's "int8" section.

    python benchmarks/bench_int8.py [--model resnet50] [--batches 1 8] [--repeats 5]

torchvision's resnet50 (random init, 224×224, TorchScript export) and its int8 forms by ONNX
Runtime's ``quantize_static`` (per channel, calibrated on 8 seeded inputs; tests/quantized_models):
QDQ and QOperator. For each batch size, interleaved in one process with the same threads: the
float model's forward, the float model's explainer, and for each int8 form its forward and its
explainer (epsilon composite). Median of ``--repeats`` runs after one warm-up, in milliseconds.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import lrp_onnx  # noqa: E402
from lrp_onnx.runtime import session_options  # noqa: E402
from sections import write_section  # noqa: E402

BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


def export(name, path):
    import torch
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def median_ms(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    import onnxruntime as ort
    import quantized_models
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {"float": export(args.model, os.path.join(folder, "float.onnx"))}
        for form in ("qdq", "qoperator"):
            paths[form] = quantized_models.quantize(paths["float"], form, os.path.join(folder, f"{form}.onnx"), "x",
                                                    (3, 224, 224))
        sessions = {k: ort.InferenceSession(p, session_options(None), providers=["CPUExecutionProvider"])
                    for k, p in paths.items()}
        explainers = {k: lrp_onnx.Explainer(p, composite="epsilon") for k, p in paths.items()}
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            for form in paths:
                forward = median_ms(lambda: sessions[form].run(None, {"x": x}), args.repeats)
                explain = median_ms(lambda: explainers[form].run({"x": x}, -1), args.repeats)
                rows.append((form, batch, forward, explain))
                print(rows[-1], flush=True)
    float_forward = {b: f for form, b, f, _ in rows if form == "float"}
    lines = [f"## int8\n\nWritten by `benchmarks/bench_int8.py`: {args.model} at 224×224, epsilon "
             f"composite, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), ONNX Runtime "
             f"{ort.__version__} CPU, median of {args.repeats} runs. The QDQ explainer also computes a float "
             "mirror of the forward for the relevance pass (docs/reference/supported-models.md).\n",
             "| form | batch | forward ms | forward / float forward | explainer ms | explainer / its forward |",
             "|---|---|---|---|---|---|"]
    for form, batch, forward, explain in rows:
        lines.append(f"| {form} | {batch} | {forward:.1f} | {forward / float_forward[batch]:.2f} | {explain:.1f} | "
                     f"{explain / forward:.1f} |")
    write_section("int8", "\n".join(lines), BENCHMARKS)


if __name__ == "__main__":
    main()

"""Half-precision models against float32: write the figures into RELIABILITY.md, between the
half-precision markers.

    python benchmarks/half_precision.py

lrp-onnx explains a float16 or bfloat16 model in float32 (lrp_onnx/precision.py). For each model
and half type this measures, per composite, the relative L2 error (max over samples) of the half
model's relevance against
- the float32 explainer of the same weights: a float32 model holding the half-precision weights.
  Upcasting is exact, so this is expected to be 0 wherever both files hold the same weights;
- the float32 explainer of the float32 original, fed the unrounded input: what rounding the
  weights and the input to half precision does to the explanation;
and the relative L2 deviation of the explainer's forward output from ONNX Runtime's CPU run of the
half model (float16 only: the CPU provider has no bfloat16 kernels) and from the float32 original.

Models:
- the bundled digits CNN (models/digits_cnn.onnx) and a random-init torchvision resnet18 at
  64×64, exported in float32 by torch.onnx; their weights rounded to float16 / bfloat16 in the
  ONNX file (``with_half_weights``);
- the same resnet18 exported by torch.onnx after ``.half()``: the exporter folds each BatchNorm
  into its conv in float16, so its weights are not the float16 weights of the float32 export.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, numpy_helper, version_converter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import lrp_onnx  # noqa: E402
from lrp_onnx.load import ai_onnx_opset  # noqa: E402
from lrp_onnx.runtime import session_options  # noqa: E402
from sections import RELIABILITY, write_section  # noqa: E402
from zennit_reference import export, relative_errors, torchvision_model  # noqa: E402

COMPOSITES = ("epsilon", "alpha-beta", "epsilon-plus-flat", "zplus")
HALF = {"float16": (TensorProto.FLOAT16, np.float16), "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
RESNET_SIZE, RESNET_SAMPLES = 64, 4
BFLOAT16_CONV_OPSET = 22


def with_half_weights(proto, half, stored_as):
    """``proto`` (a float32 model whose float tensors are all initializers, inputs and outputs)
    with its float32 initializers rounded to ``half`` and stored as ``stored_as``: "half" (inputs
    and outputs become ``half`` too) or "float32" (the float32 model of the half weights). For
    bfloat16, both are upgraded to opset 22 first: the first that allows bfloat16 Conv."""
    elem_type, numpy_type = HALF[half]
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if half == "bfloat16" and ai_onnx_opset(out) < BFLOAT16_CONV_OPSET:
        out = version_converter.convert_version(out, BFLOAT16_CONV_OPSET)
    for tensor in out.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            rounded = numpy_helper.to_array(tensor).astype(numpy_type)
            tensor.CopyFrom(numpy_helper.from_array(rounded if stored_as == "half" else rounded.astype(np.float32),
                                                    tensor.name))
    if stored_as == "half":
        for value in list(out.graph.input) + list(out.graph.output):
            if value.type.tensor_type.elem_type == TensorProto.FLOAT:
                value.type.tensor_type.elem_type = elem_type
        del out.graph.value_info[:]
    return out


def ort_outputs(proto, x):
    """ONNX Runtime's run of ``proto`` with the explainer's session options (weight prepacking off,
    which changes how float16 convolutions round)."""
    session = onnxruntime.InferenceSession(proto.SerializeToString(), session_options(None),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def relative_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure(half_model, same_weights, original, x, half):
    """{figure: value} for a half model, its float32 twin and the float32 original, on float32 ``x``."""
    numpy_type = HALF[half][1]
    rounded = x.astype(numpy_type).astype(np.float32)
    fed = x.astype(np.float16) if half == "float16" else x  # a bfloat16 model's explainer takes float32
    figures = {}
    for composite in COMPOSITES:
        outputs, relevance = lrp_onnx.Explainer(half_model, composite=composite).explain(fed)
        _, twin = lrp_onnx.Explainer(same_weights, composite=composite).explain(rounded)
        original_outputs, reference = lrp_onnx.Explainer(original, composite=composite).explain(x)
        assert np.isfinite(relevance).all(), composite
        figures[composite, "same weights"] = relative_errors(relevance, twin).max()
        figures[composite, "original"] = relative_errors(relevance, reference).max()
    logits = next(iter(outputs.values()))
    figures["forward", "original"] = relative_l2(logits, next(iter(original_outputs.values())))
    figures["forward", "ORT"] = relative_l2(logits, ort_outputs(half_model, fed)) if half == "float16" else None
    return figures


def cases(workdir):
    """(model label, half type, half model, float32 model of its weights, float32 original, x)."""
    digits = onnx.load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
    digits_x = np.load(os.path.join(ROOT, "models", "digits_samples.npy"))
    resnet = torchvision_model("resnet18", RESNET_SIZE)
    resnet_x = torch.randn(RESNET_SAMPLES, 3, RESNET_SIZE, RESNET_SIZE, generator=torch.Generator().manual_seed(1))
    resnet_path = export(resnet, resnet_x, os.path.join(workdir, "resnet18.onnx"), dynamo=False)
    resnet_proto = onnx.load(resnet_path)
    for half in HALF:
        for label, proto, x in [("digits CNN", digits, digits_x), (f"resnet18 {RESNET_SIZE}px", resnet_proto,
                                                                   resnet_x.numpy())]:
            yield (f"{label}, ONNX weights rounded", half, with_half_weights(proto, half, "half"),
                   with_half_weights(proto, half, "float32"), proto, x)
    half_export = export(torchvision_model("resnet18", RESNET_SIZE).half(), resnet_x.half(),
                         os.path.join(workdir, "resnet18-half.onnx"), dynamo=False)
    float_of_half = export(torchvision_model("resnet18", RESNET_SIZE).half().float(), resnet_x,
                           os.path.join(workdir, "resnet18-float-of-half.onnx"), dynamo=False)
    yield (f"resnet18 {RESNET_SIZE}px, torch `.half()` export", "float16", onnx.load(half_export),
           onnx.load(float_of_half), resnet_proto, resnet_x.numpy())


def summarize(rows, command, seconds):
    lines = [
        "## Half precision",
        "",
        f"- Generated by `{command}` on {datetime.date.today()} in {seconds:.0f} s; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; lrp-onnx {lrp_onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}.",
        "- float16 and bfloat16 models are explained in float32 (lrp_onnx/precision.py). Relevance: relative L2 "
        "error of the half model's relevance, max over the samples (the bundled digit samples; "
        f"{RESNET_SAMPLES} random resnet18 inputs), against the float32 explainer of *the same weights* (a float32 "
        "model holding the half-precision weights, fed the input rounded to half precision) and of *the original* "
        "float32 model (fed the unrounded input). Forward: relative L2 deviation of the explainer's score output.",
        "",
        "| model | type | relevance against | " + " | ".join(COMPOSITES) + " |",
        "|---|---|---|" + "---|" * len(COMPOSITES),
    ]
    for label, half, figures in rows:
        for against in ("same weights", "original"):
            lines.append(f"| {label} | {half} | {against} | " +
                         " | ".join(f"{figures[c, against]:.1e}" for c in COMPOSITES) + " |")
    lines += ["", "| model | type | forward against ORT's run of the half model | forward against the original |",
              "|---|---|---|---|"]
    for label, half, figures in rows:
        on_ort = figures["forward", "ORT"]
        lines.append(f"| {label} | {half} | {'no bfloat16 kernels' if on_ort is None else f'{on_ort:.1e}'} | "
                     f"{figures['forward', 'original']:.1e} |")
    same = max(figures[c, "same weights"] for label, _, figures in rows if "rounded" in label for c in COMPOSITES)
    lines += [
        "",
        f"- Against the same weights, the largest error over the rows whose two files hold the same weights is "
        f"{same:.1e}: the upcast is exact and the relevance pass is the float32 one. The torch `.half()` export "
        "differs because the exporter folds BatchNorm into the conv weights in float16, so its weights are not "
        "those of the float32 model of `.half()`'s weights.",
        "- Against the original, the error is what rounding the weights (and input) to half precision does to the "
        "explanation. It grows with the rule's conditioning: the ε-rule with ε = 1e-6 divides by "
        "pre-activations near 0, so small weight changes move its relevance most.",
        "- A float16 explainer computes its outputs with the model's own float16 forward, so against ORT's run of "
        "the model (same session options) they differ only where ORT optimizes the explainer's copy of that "
        "forward otherwise than the model alone. ORT's CPU provider has no bfloat16 kernel for Conv, Gemm, MatMul, "
        "Add, Mul, Div, Sum, Relu, MaxPool or Softmax, so a bfloat16 model's explainer computes in float32 and "
        "rounds its outputs to bfloat16.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=RELIABILITY)
    args = parser.parse_args()
    command = ("python benchmarks/half_precision.py " + " ".join(sys.argv[1:])).strip()
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as workdir:
        for label, half, half_model, same_weights, original, x in cases(workdir):
            figures = measure(half_model, same_weights, original, x, half)
            rows.append((label, half, figures))
            print(label, half, figures, flush=True)
    section = summarize(rows, command, time.perf_counter() - start)
    print(section)
    write_section("half-precision", section, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

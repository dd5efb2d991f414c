"""Every model of issue 29's list in the forms people deploy, converted and run: COVERAGE.md's
"Deployed forms" section.

    python benchmarks/coverage_deployed.py [--only NAME] [--forms qdq,fp16,...]

Each model is exported from torch (TorchScript, or torch.export for swin_t; batch 1, random init,
no download), then put in each form by the tool that writes it:
- qdq, qoperator: ``onnxruntime.quantization.quantize_static`` per channel, calibrated on 8
  seeded inputs (tests/quantized_models.py); dynamic: ``quantize_dynamic``;
- matmulnbits: ``MatMulNBitsQuantizer``, 4 bits, blocks of 16 (models with MatMul weights);
- fp16-keep-io, fp16: ``onnxruntime.transformers.float16.convert_float_to_float16``;
- bf16: torch.onnx of the model in bfloat16, opset 22;
- ort-optimized: ``onnxruntime.transformers.optimizer.optimize_model`` (transformers);
- dynamic-hw: the export with dynamic height and width (images), run at a second size.

Columns: whether it converts; the largest relative deviation of the explainer's logits from ONNX
Runtime's run of the form with the explainer's session options (0 = bit for bit); the relevance's
relative L2 distance from the reference; conversion and explanation (one batch-1 run) times. The reference, per form:
- quantized (static, dynamic): Zennit in float64 on tests/quantized_models.FloatNetwork, the float
  network read from the quantized file (dequantized weights, roundings as Pass), at the activations ORT
  computes with its graph optimisations off, against the explainer run so too (tests/test_quantized.py
  compares them the same way); where that reader lacks an op of the model the row says so. The
  notes give how far Zennit's own float32 run lies from that float64 reference: the part of the
  distance that float32 rounding alone causes;
- matmulnbits, fp16, bf16: lrp-onnx's explainer of the float32 model holding the same weights
  (dequantized, or rounded to half precision) on the same input: the form must not change the
  explanation. For bf16 the weights are the float32 export's rounded to bfloat16, while torch
  exports a bfloat16 model with BatchNorm folded into the convolutions in bfloat16 arithmetic:
  where a model has BatchNorm, the two hold different weights, and the column measures that too;
- ort-optimized: lrp-onnx's explainer of the unoptimized export (issue 29's reference);
- dynamic-hw: lrp-onnx's explainer of a static export at the size run.
Composites: epsilon for CNNs, attnlrp for transformers. Rows are cached in
benchmarks/coverage_deployed.json as they finish.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import exporters  # noqa: E402
import lrp_onnx  # noqa: E402
from coverage import _first_line  # noqa: E402
from lrp_onnx.runtime import session_options  # noqa: E402
from sections import write_section  # noqa: E402

COVERAGE = os.path.join(ROOT, "COVERAGE.md")
CACHE = os.path.join(HERE, "coverage_deployed.json")
QUANTIZED = ("qdq", "qoperator", "dynamic")
IMAGE_FORMS = ("qdq", "qoperator", "dynamic", "fp16-keep-io", "fp16", "bf16", "dynamic-hw")
TRANSFORMER_FORMS = ("qdq", "qoperator", "dynamic", "matmulnbits", "fp16-keep-io", "fp16", "bf16", "ort-optimized")
# name -> (family, input shape of one sample, forms)
MODELS = {
    "resnet18": ("cnn", (3, 224, 224), IMAGE_FORMS),
    "mobilenet_v3_small": ("cnn", (3, 224, 224), IMAGE_FORMS),
    "efficientnet_b0": ("cnn", (3, 224, 224), IMAGE_FORMS),
    "convnext_tiny": ("cnn", (3, 224, 224), IMAGE_FORMS),
    "r3d_18": ("video", (3, 8, 112, 112), IMAGE_FORMS),
    "vit_b_16": ("vision transformer", (3, 224, 224), TRANSFORMER_FORMS + ("dynamic-hw",)),
    "swin_t": ("vision transformer", (3, 224, 224), TRANSFORMER_FORMS + ("dynamic-hw",)),
    "hf ViT (tiny)": ("vision transformer", (3, 32, 32), TRANSFORMER_FORMS + ("dynamic-hw",)),
    "bert": ("text", None, TRANSFORMER_FORMS),
    "distilbert": ("text", None, TRANSFORMER_FORMS),
    "roberta": ("text", None, TRANSFORMER_FORMS),
}
# exported by torch.export: swin_t's TorchScript export pads each window partition by amounts it
# computes from shapes, which leaves its Slices without static sizes (COVERAGE.md, Transformers)
DYNAMO = ("swin_t",)
# a second size for dynamic-hw rows
OTHER_SIZE = {"cnn": (3, 160, 192), "video": (3, 8, 96, 128)}
# Why a form does not apply, where that is known before trying
NOT_APPLICABLE = {
    "vit_b_16/dynamic-hw": "the model takes one size: its position embeddings are fixed (torchvision asserts it)",
    "hf ViT (tiny)/dynamic-hw": "the model takes one size: its position embeddings are fixed",
    "swin_t/dynamic-hw": "not exported: TorchScript bakes the window partition's padding for the traced size",
}


def torch_model(name):
    import torch
    import torchvision
    torch.manual_seed(0)
    family = MODELS[name][0]
    if family == "text":
        return exporters.hf_text_model(name)
    if name == "hf ViT (tiny)":
        import transformers
        model = exporters._logits_only(transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=10, attn_implementation="eager")))
    elif family == "video":
        model = torchvision.models.video.r3d_18(num_classes=10)
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():  # zero-initialised heads
                torch.nn.init.normal_(module.weight, std=0.02)
            # fresh BatchNorm statistics make deep random-init CNNs' logits vanish (mobilenet_v3's
            # are 0 in float16): random ones, as tests/zennit_reference.py draws them
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def feeds_of(name, shape=None):
    family, default, _ = MODELS[name]
    if family == "text":
        feeds = exporters.padded_tokens(batch=1)
        return {k: v for k, v in feeds.items()}
    return {"x": np.random.default_rng(1).standard_normal((1, *(shape or default))).astype(np.float32)}


def export(model, name, feeds, path, dynamic_size=False, dtype=None):
    """TorchScript, batch dynamic (and height, width, frames where ``dynamic_size``), opset 17, or
    22 for bfloat16 (its first with bfloat16 Conv); the float32 models of DYNAMO by torch.export."""
    import torch
    if MODELS[name][0] == "text":
        exporters.export_text(model if dtype is None else model.to(dtype), feeds, path, "torchscript",
                              opset=17 if dtype is None else 22)
        return path
    x = torch.tensor(feeds["x"])
    if name in DYNAMO and dtype is None and not dynamic_size:  # batch 2: torch.export specializes a batch of 1
        exporters.export_torch(model, torch.cat([x, x]), path, "dynamo")
        return path
    if dtype is not None:
        model, x = model.to(dtype), x.to(dtype)
    axes = {0: "batch"}
    if dynamic_size:
        axes.update({k: f"d{k}" for k in range(2, x.dim())})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=22 if dtype is not None else 17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": axes, "logits": {0: "batch"}})
    return path


class TokenCalibration:
    """Calibration data for a text model: 8 seeded token batches."""

    def __init__(self, feeds):
        rng = np.random.default_rng(0)
        self.batches = iter([{k: (rng.integers(3, 50, v.shape) if k == "input_ids" else v) for k, v in feeds.items()}
                             for _ in range(8)])

    def get_next(self):
        return next(self.batches, None)


def quantized(name, path, form, out, feeds, notes):
    """``path`` quantized as ONNX Runtime's documentation does it, quant_pre_process first. Where
    ORT's symbolic shape inference fails on the export, again without it, as a user would (and
    ``notes`` says so)."""
    try:
        return quantized_prepared(name, path, form, out, feeds)
    except Exception as e:
        notes.append(f"made with quant_pre_process(skip_symbolic_shape=True): with it, {_first_line(e)}")
        return quantized_prepared(name, path, form, out, feeds, skip_symbolic_shape=True)


def quantized_prepared(name, path, form, out, feeds, **preprocess):
    import quantized_models
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if MODELS[name][0] != "text" or form == "dynamic":
        return quantized_models.quantize(path, form, out, "x", MODELS[name][1], **preprocess)
    prepared = out + ".prepared.onnx"
    quant_pre_process(path, prepared, **preprocess)
    quantize_static(prepared, out, TokenCalibration(feeds), per_channel=True, weight_type=QuantType.QInt8,
                    quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QInt8 if form == "qdq" else QuantType.QUInt8)
    return out


def float16(path, out, keep_io):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(path), keep_io_types=keep_io), out)
    return out


def with_weights(path, out, weights):
    """The model at ``path`` with ``weights`` ({initializer: float32 array}) in place of its own."""
    model = onnx.load(path)
    for t in model.graph.initializer:
        if t.name in weights:
            t.CopyFrom(onnx.numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    onnx.save(model, out)
    return out


def rounded_weights(path, dtype):
    """The float32 initializers of ``path`` rounded to float16 (bfloat16 through torch) and back."""
    import torch
    model = onnx.load(path)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == 1}
    if dtype == "float16":
        return {k: v.astype(np.float16).astype(np.float32) for k, v in values.items()}
    return {k: torch.tensor(v).to(torch.bfloat16).float().numpy() for k, v in values.items()}


def nbits_float_model(path, out):
    """The MatMulNBits model as float MatMuls of its dequantized weights (tests/quantized_models)."""
    import quantized_models
    model = onnx.load(path)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        weight = quantized_models.nbits_dequantized(node, values)
        model.graph.initializer.append(onnx.numpy_helper.from_array(weight, node.name + "/weight"))
        product = node.output[0] + "/product" if len(node.input) > 5 and node.input[5] else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], node.name + "/weight"], [product]))
        if product != node.output[0]:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[5]], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, out)
    return out


def optimized(name, path, out):
    from onnxruntime.transformers.optimizer import optimize_model
    text = MODELS[name][0] == "text"
    config = exporters.hf_text_config(name) if text else {}
    heads = {"vit_b_16": 12, "swin_t": 3, "hf ViT (tiny)": 2}.get(name, config.get("num_attention_heads",
                                                                                  config.get("n_heads")))
    hidden = {"vit_b_16": 768, "swin_t": 96, "hf ViT (tiny)": 16}.get(name, config.get("hidden_size",
                                                                                     config.get("dim")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(path, model_type="bert" if text else "vit", num_heads=heads, hidden_size=hidden)
    model.save_model_to_file(out)
    return out


def zennit_reference(path, feeds, targets, dtype=np.float64):
    """Zennit's epsilon relevance on the float network read from the quantized file, in float64 by
    default: with ε = 1e-6 the rounding of a float32 run moves the relevance of a deep network by
    up to 1e-2 (a dynamically quantized resnet18), and the explainer's integer products are exact."""
    import quantized_models
    observed = {k: v.astype(dtype) for k, v in quantized_models.observed_activations(path, feeds["x"]).items()}
    network = quantized_models.FloatNetwork(path, observed).eval().to(torch_type(dtype))
    composite = quantized_models.zennit_composite("epsilon")
    return quantized_models.zennit_relevance(network, feeds["x"].astype(dtype), targets, composite)[1]


def torch_type(dtype):
    import torch
    return {np.float64: torch.float64, np.float32: torch.float32}[dtype]


def loads_in_onnx_runtime(path):
    """Whether ONNX Runtime's CPU provider creates a session for ``path`` without crashing."""
    probe = "import sys, onnxruntime; onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    return subprocess.run([sys.executable, "-c", probe, path], capture_output=True).returncode >= 0


def unoptimised_relevance(explainer, feeds, targets):
    """The explainer's relevance with ONNX Runtime's graph optimisations off: the activations
    zennit_reference holds are those of such a run (tests/quantized_models.observed_activations);
    ORT's fused integer kernels round some of them otherwise."""
    import onnxruntime as ort
    options = session_options(None)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(explainer.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["relevance"], dict(feeds, target=targets))[0]


def relative_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def build(name, form, folder, notes):
    """(form file, feeds, reference: a callable giving the reference relevance, or a reason string);
    what the row should say about how the form was made is appended to ``notes``."""
    import torch
    family = MODELS[name][0]
    composite = "epsilon" if family in ("cnn", "video") else "attnlrp"
    model = torch_model(name)
    feeds = feeds_of(name)
    base = export(model, name, feeds, os.path.join(folder, "float.onnx"))

    def ours(path, run_feeds=feeds):
        return lambda targets: lrp_onnx.Explainer(path, composite=composite).run(run_feeds, targets)["relevance"]

    out = os.path.join(folder, f"{form}.onnx")
    if form in ("qdq", "qoperator", "dynamic"):
        path = quantized(name, base, form, out, feeds, notes)
        if family == "text":
            return path, feeds, "no independent reference: the float-network reader covers CNN ops"
        return path, feeds, lambda targets: zennit_reference(path, feeds, targets)
    if form == "matmulnbits":
        import quantized_models
        path = quantized_models.nbits_quantized(base, out)
        return path, feeds, ours(nbits_float_model(path, os.path.join(folder, "nbits_float.onnx")))
    if form in ("fp16-keep-io", "fp16"):
        path = float16(base, out, keep_io=form == "fp16-keep-io")
        if form == "fp16":  # the input too is float16: the reference sees the same rounded values
            feeds = {k: v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v
                     for k, v in feeds.items()}
        reference = with_weights(base, os.path.join(folder, "rounded.onnx"), rounded_weights(base, "float16"))
        return path, feeds, ours(reference, feeds)
    if form == "bf16":
        path = export(model, name, feeds, out, dtype=torch.bfloat16)
        # the explainer rounds a bfloat16 input on the way in: the reference sees the same values
        feeds = {k: torch.tensor(v).to(torch.bfloat16).float().numpy() if v.dtype == np.float32 else v
                 for k, v in feeds.items()}
        reference = with_weights(base, os.path.join(folder, "rounded.onnx"), rounded_weights(base, "bfloat16"))
        return path, feeds, ours(reference, feeds)
    if form == "ort-optimized":
        return optimized(name, base, out), feeds, ours(base)
    if form == "dynamic-hw":
        other = feeds_of(name, OTHER_SIZE[family])
        path = export(torch_model(name), name, feeds, out, dynamic_size=True)
        static = export(torch_model(name), name, other, os.path.join(folder, "static_other.onnx"))
        return path, other, ours(static, other)
    raise ValueError(form)


def measure(name, form):
    import onnxruntime as ort
    key = f"{name}/{form}"
    if key in NOT_APPLICABLE:
        return {"converts": "n/a", "why": NOT_APPLICABLE[key]}
    family = MODELS[name][0]
    composite = "epsilon" if family in ("cnn", "video") else "attnlrp"
    with tempfile.TemporaryDirectory() as folder:
        try:
            notes = []
            path, feeds, reference = build(name, form, folder, notes)
        except Exception as e:
            return {"converts": "n/a", "why": f"the form could not be made: {_first_line(e)}"}
        if path is None:
            return {"converts": "n/a", "why": reference}
        row = {"nodes": len(onnx.load(path).graph.node), **({"made": notes[0]} if notes else {})}
        # ONNX Runtime 1.32's NCHWc layout optimizer segfaults on some float16 forms (vit_b_16): probe
        # in a subprocess, and where it does, run the form and its explainer without that optimizer
        disabled = [] if loads_in_onnx_runtime(path) else ["NchwcTransformer"]
        if disabled:
            row["own_run"] = ("ONNX Runtime segfaults creating a session for the form, and for its explainer, which "
                              "runs the form's own forward (its NchwcTransformer); both measured with it disabled")
        try:
            # the explainer's session options: ORT's weight prepacking, which they turn off, changes how
            # a float16 model's convolutions round
            own_session = ort.InferenceSession(path, session_options(None), providers=["CPUExecutionProvider"],
                                               disabled_optimizers=disabled)
            types = {i.name: i.type for i in own_session.get_inputs()}
            feeds = {k: v.astype(np.float16) if types.get(k) == "tensor(float16)" else v for k, v in feeds.items()}
            own = own_session.run(None, feeds)[0].astype(np.float32)
        except Exception as e:  # ONNX Runtime's CPU provider has no bfloat16 Conv, MatMul...
            own, row["own_run"] = None, f"ONNX Runtime cannot run the form: {_first_line(e)}"
        try:
            start = time.perf_counter()
            explainer = lrp_onnx.convert(path, composite)
            session = ort.InferenceSession(explainer.SerializeToString(), session_options(None),
                                           providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            row["convert_s"] = time.perf_counter() - start
            start = time.perf_counter()
            outputs = session.run(None, dict(feeds, target=np.array([-1])))  # the predicted class
            run = dict(zip([o.name for o in session.get_outputs()], outputs))
            row["explain_s"] = time.perf_counter() - start
        except Exception as e:
            return dict(row, converts="no", why=_first_line(e))
        logits = np.asarray(run["logits"], np.float32)
        targets = np.argmax(logits, axis=1)
        row["converts"] = "yes"
        if own is not None:
            row["output_deviation"] = float(np.abs(logits - own).max() / max(np.abs(own).max(), 1e-30))
        row["finite"] = bool(np.isfinite(run["relevance"]).all())
        row["largest_logit"] = float(np.abs(logits).max())
        if callable(reference):
            try:
                relevance = unoptimised_relevance(explainer, feeds, targets) if form in QUANTIZED else run["relevance"]
                expected = reference(targets)
                row["relevance_error"] = relative_l2(relevance, expected)
                if form in QUANTIZED:  # how far float32 rounding alone moves the relevance here
                    row["float32_gap"] = relative_l2(zennit_reference(path, feeds, targets, np.float32), expected)
            except Exception as e:
                row["reference"] = f"no reference: {_first_line(e)}"
        else:
            row["reference"] = reference
        return row


def table(rows):
    lines = ["| model | form | converts | logits vs the form's run | relevance vs reference | convert s | explain s |"
             " notes |", "|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        name, form = key.rsplit("/", 1)
        deviation = "" if "output_deviation" not in row else \
            ("bit for bit" if row["output_deviation"] == 0 else f"{row['output_deviation']:.1e}")
        error = f"{row['relevance_error']:.1e}" if "relevance_error" in row else ""
        notes = [row.get("made"), row.get("why"), row.get("own_run"), row.get("reference"),
                 f"Zennit in float32 is {row['float32_gap']:.1e} from its float64 reference" if "float32_gap" in row
                 else None,
                 None if row.get("finite", True) else "non-finite relevance",
                 "logits ≈ 0 (random init): the comparison says little" if row.get("largest_logit", 1) < 1e-3 else None]
        note = "; ".join(n for n in notes if n)
        times = [f"{row[k]:.1f}" if k in row else "" for k in ("convert_s", "explain_s")]
        lines.append(f"| {name} | {form} | {row['converts']} | {deviation} | {error} | {' | '.join(times)} | {note} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="models whose name contains this")
    parser.add_argument("--forms", help="comma-separated forms")
    parser.add_argument("--redo", action="store_true", help="measure the selected rows again, even if cached")
    args = parser.parse_args()
    rows = json.load(open(CACHE)) if os.path.exists(CACHE) else {}
    # ONNX Runtime's quantization tools leave files in the working directory (calibration data,
    # sym_shape_infer_temp.onnx): not in the checkout
    os.chdir(tempfile.mkdtemp(prefix="coverage_deployed_"))
    forms = args.forms.split(",") if args.forms else None
    for name, (_, _, model_forms) in MODELS.items():
        if args.only and args.only not in name:
            continue
        for form in model_forms:
            key = f"{name}/{form}"
            if (forms and form not in forms) or (key in rows and not args.redo):
                continue
            start = time.perf_counter()
            rows[key] = measure(name, form)
            print(f"{key}: {rows[key]} ({time.perf_counter() - start:.0f} s)", flush=True)
            json.dump(rows, open(CACHE, "w"), indent=1)
    unmeasured = {"converts": "not run", "why": "not measured yet: run this script with --only NAME"}
    ordered = {f"{n}/{f}": rows.get(f"{n}/{f}", unmeasured) for n, (_, _, fs) in MODELS.items() for f in fs}
    converted = sum(r["converts"] == "yes" for r in ordered.values())
    text = (f"## Deployed forms\n\nWritten by `benchmarks/coverage_deployed.py` on "
            f"{datetime.date.today()} (2 CPU cores, ONNX Runtime CPU): {converted} of {len(ordered)} rows convert; "
            f"every other row says why, or that it was not measured. The script's docstring defines each form, column and reference.\n\n"
            + table(ordered))
    write_section("deployed-forms", text, COVERAGE)


if __name__ == "__main__":
    main()

"""Build every model of the coverage list, convert it, run it, and write COVERAGE.md.

    python benchmarks/coverage.py                 # everything (about an hour on 2 cores)
    python benchmarks/coverage.py --only resnet   # rows whose model name contains "resnet"

The transformers section is coverage_transformers.py's; this script keeps it.

Per model × exporter: the opset and node count of the file, whether it converts and runs, the
largest deviation of the explainer's original outputs from ONNX Runtime's run of the model, the
conservation error, and the conversion and explanation times. Rows are cached in
benchmarks/coverage.json as they finish, so an interrupted run resumes where it stopped.

"Converts and runs" means: conversion succeeds, the explainer's original outputs equal the
model's within 1e-5 relative (light zoo: also the stored expected output, within the backend
suite's tolerance), the relevance is finite, and ``onnx.checker`` ``full_check`` passes.

Conservation is measured under two configurations that conserve relevance in exact arithmetic,
both with biases left out of the rules (``zero_params=["bias"]``) and a stabilizer of 1e-30, far
below the activations of these random-init models:
- epsilon (LRP-0 in the limit). Without the bias, z can be near zero where the activation is not
  (large biases), and R/z then amplifies float32 rounding;
- zplus, whose denominators are sums of positive contributions, free of cancellation, but which
  loses the relevance of a neuron with no positive contribution at all (all-negative weights).
Conservation holds for a row if it holds within 1e-4 under at least one of them. The other
columns come from the zplus run.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import exporters  # noqa: E402
from lrp_onnx.errors import LrpOnnxError  # noqa: E402
from lrp_onnx.load import ai_onnx_opset  # noqa: E402
from lrp_onnx.verify import verify  # noqa: E402
from sections import marked_sections  # noqa: E402

CONSERVING = {"composite": "zplus", "zero_params": ["bias"], "stabilizer": 1e-30}
EPSILON_CONSERVING = {"composite": "epsilon", "zero_params": ["bias"], "epsilon": 1e-30, "stabilizer": 1e-30}
OUTPUT_TOLERANCE = 1e-5
CONSERVATION_TOLERANCE = 1e-4


def cases():
    """(family, model, exporter, build) where build(path) writes the file and returns
    (path actually used, feeds, expected output or None, (rtol, atol) or None)."""
    for name in exporters.TORCHVISION:
        for exporter in ("torchscript", "dynamo"):
            yield "torchvision", name, exporter, _torch_builder(name, exporter)
    for name in exporters.TOO_LARGE:
        yield "torchvision", name, "both", None
    for name in exporters.light_zoo_available():
        yield "onnx light zoo", name, "caffe2", _light_builder(name)
    for name in exporters.KERAS_MODELS:
        for exporter in ("keras", "tf2onnx"):
            yield "keras", name, exporter, _keras_builder(name, exporter)
    for name in exporters.SKLEARN:
        for zipmap in (True, False):
            yield "scikit-learn", name, f"skl2onnx{'' if zipmap else ' zipmap=False'}", _sklearn_builder(name, zipmap)
        yield "scikit-learn", f"{name} (2 classes)", "skl2onnx", _sklearn_builder(name, True, binary=True)


def _torch_builder(name, exporter):
    def build(path):
        return path, exporters.torchvision_classifier(name, path, exporter), None, None
    return build


def _light_builder(name):
    def build(_):
        path, feeds, expected = exporters.light_zoo(name)
        return path, feeds, expected, exporters.LIGHT_ZOO_TOLERANCE.get(name, (1e-3, 1e-7))
    return build


def _keras_builder(name, exporter):
    """The models and exporters of tests/test_keras.py, imported late: TensorFlow must come after torch."""
    def build(path):
        import onnxruntime
        import test_keras
        model = test_keras.build(name)
        test_keras.EXPORTERS[exporter](model, path)
        input_name = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
        x = np.random.default_rng(0).uniform(0, 1, (3,) + model.input_shape[1:]).astype(np.float32)
        return path, {input_name: x}, None, None
    return build


def _sklearn_builder(name, zipmap, binary=False):
    def build(path):
        return path, exporters.sklearn_classifier(name, path, zipmap, binary), None, None
    return build


def measure(build, folder):
    row = {}
    try:
        path, feeds, expected, tolerance = build(os.path.join(folder, "model.onnx"))
    except Exception as e:  # an exporter's failure is a row of the table, not a crash
        return {"converted": f"no: the exporter failed ({type(e).__name__}: {_first_line(e)})"}
    model = onnx.load(path, load_external_data=False)
    row.update(opset=ai_onnx_opset(model), nodes=len(model.graph.node))
    try:
        result = verify(path, feeds=feeds, threads=2, **CONSERVING)
        epsilon = verify(path, feeds=feeds, threads=2, **EPSILON_CONSERVING)
    except LrpOnnxError as e:
        return {**row, "converted": f"no: {_first_line(e)}"}
    except Exception as e:
        traceback.print_exc()
        return {**row, "converted": f"no: {type(e).__name__}: {_first_line(e)}"}
    row.update(deviation=max(result.output_deviation, epsilon.output_deviation),
               conservation=result.conservation_error, conservation_epsilon=epsilon.conservation_error,
               convert_s=result.convert_seconds, explain_s=result.explain_seconds)
    problems = []
    if row["deviation"] > OUTPUT_TOLERANCE:
        problems.append(f"outputs deviate by {row['deviation']:.1e}")
    if not (result.finite and epsilon.finite):
        problems.append("relevance is not finite")
    if expected is not None and not _matches_stored(path, feeds, expected, tolerance):
        problems.append("the output differs from the stored expected output")
    if not problems and min(result.conservation_error, epsilon.conservation_error) > CONSERVATION_TOLERANCE:
        row["note"] = "conservation misses 1e-4"
    row["converted"] = "yes" if not problems else "no: " + "; ".join(problems)
    return row


def _matches_stored(path, feeds, expected, tolerance):
    from lrp_onnx.runtime import Explainer
    outputs, _ = Explainer(path, **CONSERVING).explain(feeds)
    rtol, atol = tolerance
    return np.allclose(next(iter(outputs.values())), expected, rtol=rtol, atol=atol)


def _first_line(error):
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


def write_table(rows, path):
    import onnxruntime
    import torch
    converted = sum(r.get("converted") == "yes" for r in rows)
    conserved = sum(r.get("converted") == "yes" and not r.get("note") for r in rows)
    lines = [
        "# Coverage",
        "",
        f"- Generated by `python benchmarks/coverage.py` on {datetime.date.today()}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 2 ORT threads",
        f"- Versions: onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- **{converted} of {len(rows)} rows convert and run**; conservation holds within 1e-4 in {conserved} "
        "of them.",
        "- *converts*: conversion succeeds, the explainer's original outputs equal ONNX Runtime's run of the "
        "model within 1e-5 relative (light zoo: and the stored expected output within the backend suite's "
        "tolerance), the relevance is finite, `onnx.checker` `full_check` passes.",
        "- *deviation*: max |explainer − model| / max |model| over all original outputs.",
        "- *conservation*: max over samples of |Σ R − explained logit| / |explained logit|, under two "
        "configurations that conserve in exact arithmetic, both with `zero_params=[\"bias\"]` and stabilizer "
        "1e-30: *z⁺* (zplus composite; loses the relevance of neurons without positive contributions) and *ε* "
        "(epsilon composite, ε = 1e-30; amplifies rounding where z without its bias is near zero). It holds "
        "for a row if either is within 1e-4; ✗ marks a row where neither is.",
        "- *convert*, *explain*: seconds for the zplus conversion and for one explainer run of the batch "
        "(torchvision: 2 random images at the size below; light zoo: the suite's input; Keras: 3 random "
        "images; scikit-learn: 7 rows).",
        "- torchvision models are random-init with 10 classes, with a dynamic batch axis, at 64×64 "
        "(inception_v3: 96×96; alexnet and VGG: 224×224, the size their adaptive pooling exports from).",
        "",
        "| family | model | exporter | opset | nodes | converts | deviation | conservation z⁺ | conservation ε | "
        "convert (s) | explain (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["family"], r["model"], r["exporter"], r.get("opset", ""), r.get("nodes", ""), r["converted"],
                 _sci(r.get("deviation")), _sci(r.get("conservation")),
                 _sci(r.get("conservation_epsilon")) + (" ✗" if r.get("note") else ""),
                 _fixed(r.get("convert_s")), _fixed(r.get("explain_s"), 3)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    kept = marked_sections(path)  # other scripts' sections (coverage_transformers.py)
    with open(path, "w") as f:
        f.write("\n".join(lines + [""] + kept) + "\n")


def _sci(value):
    return "" if value is None else f"{value:.1e}"


def _fixed(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="only models whose name contains this text")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--output", default=os.path.join(ROOT, "COVERAGE.md"))
    args = parser.parse_args(argv)
    cache_path = os.path.join(ROOT, "benchmarks", "coverage.json")
    cache = {} if args.fresh or not os.path.exists(cache_path) else json.load(open(cache_path))
    rows = []
    for family, model, exporter, build in cases():
        key = f"{family}/{model}/{exporter}"
        if args.only and args.only not in model:
            if key in cache:
                rows.append(cache[key])
            continue
        if key not in cache or args.only:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                row = measure(build, folder) if build else {"converted": "no: " + exporters.TOO_LARGE[model]}
            cache[key] = {"family": family, "model": model, "exporter": exporter, **row}
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=1)
            print(f"{key}: {row.get('converted')} dev={_sci(row.get('deviation'))} eps={_sci(row.get('conservation_epsilon'))} "
                  f"cons={_sci(row.get('conservation'))} ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(cache[key])
    write_table(rows, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

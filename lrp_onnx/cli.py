"""The ``lrp-onnx`` command line: ``convert``, ``inspect``, ``explain``, ``evaluate``, ``compare``, ``check``
and ``export-triton``.

Exit codes (``EXIT_CODES``, one per class of ``errors``; the README lists them): 0 success, 1 an
internal error (a bug: please report it), 2 bad input or arguments, 3 a model that cannot be loaded
or whose relevance cannot reach the explained input, 4 an unsafe model, 5 an unsupported model, 6
an output that cannot or may not be written, 7 another runtime that cannot run an explainer or
disagrees with ONNX Runtime, 8 (explain) some inputs could not be explained while the others were.
"""

import argparse
import contextlib
import csv
import os
import sys
import time
import warnings
from importlib.metadata import version

import numpy as np

from .analysis.compare import compare, write_grid
from .analysis.compare import report as comparison_report
from .analysis.compare import write_json as write_comparison
from .analysis.evaluate import context_report, evaluate, parse_method, plot, read_boxes, read_masks, report, write_json
from .composites import (
    AUTO,
    CNN_COMPOSITE,
    COMPOSITES,
    DEFAULT_COMPOSITE,
    METHODS,
    TRANSFORMER_COMPOSITE,
    composite_name,
)
from .emit import convert_held, is_explainer, read_metadata
from .errors import (
    InputError,
    LrpOnnxError,
    ModelLoadError,
    ModelWarning,
    OutputError,
    RelevancePathError,
    RelevanceWarning,
    RuleError,
    RuntimeMismatchError,
    UnsafeModelError,
    UnsupportedModelError,
    first_line,
)
from .explain import explain_to_folder, read_labels
from .external import DATA_SUFFIX, EXTERNAL_DATA_THRESHOLD, external_files, wants_external_data
from .io.files import writable_folder
from .io.run_folder import default_run_folder
from .io.heatmap import COLORMAPS
from .io.inputs import InputReader, InputSpec, Preprocess, read_inputs
from .load import read_model
from .plan import describe_breaks, plan
from .runtime import Explainer, save_model
from .runtimes import RUNTIMES, TOLERANCE, check, sample_feeds
from .text import token_table, write_text_explanations

EXIT_OK, EXIT_INTERNAL = 0, 1
EXIT_SOME_INPUTS_FAILED = 8  # explain: the other inputs were explained, the failed ones have error rows
# The most specific class first: UnsafeModelError is a ModelLoadError with its own code.
EXIT_CODES = (
    (InputError, 2),
    (RuleError, 2),
    (UnsafeModelError, 4),
    (ModelLoadError, 3),
    (RelevancePathError, 3),
    (UnsupportedModelError, 5),
    (OutputError, 6),
    (RuntimeMismatchError, 7),
    (LrpOnnxError, 2),
)


def exit_code(error):
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))


def _floats(text):
    """Comma-separated floats (per-channel values)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None


OTHER_RUNTIMES = sorted(set(RUNTIMES) - {"ort"})


def _runtimes(text):
    """One runtime name or several, comma-separated. One value per flag, so that a model named
    after the flag is not taken for a runtime (`check --runtime openvino MODEL`)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OTHER_RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown runtime {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(OTHER_RUNTIMES)} (several: a,b or the flag again)"
        )
    return names


def _composite(text):
    """A composite's name, or Zennit's name for it (composites.composite_name)."""
    try:
        return composite_name(text)
    except RuleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _input_shape(text):
    """NAME=D1,D2,...: each D a size, or a name for a size left dynamic."""
    name, _, dims = text.partition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME=DIMS such as x=1,3,224,224, got {text!r}")
    return name, [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in dims.split(",")]


def _bound(text):
    """A float, or a comma-separated per-channel list."""
    values = _floats(text)
    return values[0] if len(values) == 1 else values


def _at_least(smallest):
    def parse(text):
        value = int(text)
        if value < smallest:
            raise argparse.ArgumentTypeError(f"must be at least {smallest}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message: "invalid int value: 'x'"
    return parse


_positive_int, _non_negative_int = _at_least(1), _at_least(0)


def _add_rule_flags(p, composite_default=DEFAULT_COMPOSITE, bounds=("--low", "--high"), choose=True):
    """The rule flags, the same in every command. ``bounds``: the names that set zbox's bounds
    besides --zbox-low/--zbox-high (evaluate gives --low/--high to its noise range). ``choose``:
    the command takes --composite, --method and --input (evaluate names methods in its own --method)."""
    if choose:
        p.add_argument(
            "--composite",
            default=composite_default,
            type=_composite,
            metavar="NAME",
            help=f"rule assignment: auto (the default: {TRANSFORMER_COMPOSITE} where the model has "
            f"attention, else {CNN_COMPOSITE}, the seed paper's), {', '.join(COMPOSITES)}, or "
            "Zennit's names for them (epsilon_plus_flat, EpsilonPlusFlat)",
        )
    p.add_argument("--alpha", type=float, help="alpha-beta: alpha (default 2)")
    p.add_argument("--beta", type=float, help="alpha-beta: beta (default 1); alpha - beta must be 1")
    p.add_argument("--epsilon", type=float, help="epsilon rule: epsilon (default 1e-6)")
    p.add_argument("--gamma", type=float, help="gamma rule: gamma (default 0.25)")
    p.add_argument(
        "--zbox-low",
        *bounds[:1],
        dest="zbox_low",
        type=_bound,
        help="zbox: lowest input value, scalar or per-channel list (default 0)",
    )
    p.add_argument(
        "--zbox-high",
        *bounds[1:],
        dest="zbox_high",
        type=_bound,
        help="zbox: highest input value, scalar or per-channel list (default 1)",
    )
    p.add_argument(
        "--stabilizer",
        type=float,
        help="denominator stabilizer of the other rules, and the epsilon of norm (default 1e-6)",
    )
    if choose:
        p.add_argument(
            "--method",
            default="lrp",
            choices=METHODS,
            help="lrp (default), or a baseline: gradient, sensitivity (gradient²), gradient-x-input",
        )
        p.add_argument(
            "--input",
            dest="input_name",
            metavar="NAME",
            help="graph input to explain (default: the first float input, else an integer image, else "
            "the token ids), or a float tensor inside the graph to give relevance at",
        )
        p.add_argument(
            "--shape",
            action="append",
            type=_input_shape,
            metavar="NAME=DIMS",
            help="pin a graph input's sizes, e.g. x=1,3,224,224 (a name keeps a size dynamic: "
            "x=N,3,224,224); repeatable",
        )
    p.add_argument(
        "--zero-bias",
        action="store_true",
        help="layer rules ignore biases, so relevance is conserved (Zennit's zero_params=['bias'])",
    )
    p.add_argument("--rules", metavar="FILE", help="JSON or TOML file: node-name glob or op type -> rule")


def rule_params(args):
    """The rule flags as ``convert``'s keyword parameters (RuleParams' fields and the rules file),
    unset ones left out."""
    values = {
        "alpha": args.alpha,
        "beta": args.beta,
        "epsilon": args.epsilon,
        "gamma": args.gamma,
        "low": args.zbox_low,
        "high": args.zbox_high,
        "stabilizer": args.stabilizer,
        "zero_params": ["bias"] if args.zero_bias else None,
        "rules": args.rules,
    }
    return {k: v for k, v in values.items() if v is not None}


def _conversion(args):
    """Everything ``convert`` takes from the rule flags that was set: composite, method, rules,
    input and rule parameters."""
    values = dict(
        rule_params(args),
        composite=args.composite,
        input_name=args.input_name,
        method=None if args.method == "lrp" else args.method,
        input_shapes=dict(args.shape) if args.shape else None,
    )
    return {k: v for k, v in values.items() if v is not None}


def default_output(model_path):
    root = model_path[:-5] if model_path.endswith(".onnx") else model_path
    return root + ".lrp.onnx"


def _check_output(path, args, inputs):
    """``path`` may be written: it is none of the input's files, and exists only with --force."""
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
        raise OutputError(f"refusing to overwrite the input model's file {path!r}; choose another -o")
    if os.path.exists(path) and not args.force:
        raise OutputError(f"{path!r} exists; pass --force to overwrite it")


def cmd_convert(args):
    out = args.output or default_output(args.model)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise OutputError(f"{out!r}: the folder {folder!r} does not exist")
    writable_folder(folder)
    data = external_files(args.model) if os.path.isfile(args.model) else []
    inputs = [args.model] + data
    _check_output(out, args, inputs)
    with _timed(args, "converted the model"):
        explainer, held = convert_held(args.model, layers=args.layer, layer_sum=args.layer_sum, **_conversion(args))
    # A model that keeps its weights beside it gets an explainer that does too: OUT and OUT.data.
    external = bool(data) or args.external_data or wants_external_data(explainer, held)
    if external:
        _check_output(out + DATA_SUFFIX, args, inputs)
    try:
        save_model(explainer, out, external_data=external, held=held)
    except OSError as e:  # a full disk, say: atomic_write has removed its temporary file
        raise OutputError(f"{out!r}: cannot write ({e.strerror or e})") from None
    made = read_metadata(explainer)
    print(
        f"wrote {out}{f' and {out}{DATA_SUFFIX}' if external else ''} "
        f"({made['composite'] if made['method'] == 'lrp' else made['method']})"
    )
    if args.check_runtime:
        _report_parity(out, args.check_runtime, None, TOLERANCE)
    return EXIT_OK


def cmd_check(args):
    proto, label = read_model(args.explainer)
    if not is_explainer(proto):
        raise InputError(f"{label}: not an explainer graph; convert it first")
    feeds = None
    if args.old_input is not None:
        print(
            "lrp-onnx: warning: check --input is deprecated: use --data (--input names a graph input in every "
            "other command)",
            file=sys.stderr,
        )
    data = args.data or args.old_input
    if data:
        feeds = _feeds_with_input(args.explainer, read_metadata(proto).get("explained_input"), data)
    _report_parity(args.explainer, args.runtime, feeds, args.tolerance, args.repeats)
    return EXIT_OK


def _feeds_with_input(path, explained, array_path):
    """Sampled feeds, with the explained input taken from an .npy file."""
    try:
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{array_path}: cannot read the array ({first_line(e)})") from None
    feeds = sample_feeds(path, batch=len(array))
    if explained not in feeds:
        raise InputError(f"{path}: the explainer does not name the input it explains")
    feeds[explained] = array.astype(feeds[explained].dtype)
    return feeds


def _report_parity(path, runtimes, feeds, tolerance, repeats=3):
    """Run ``path`` on each runtime and print a table; RuntimeMismatchError if any runtime fails."""
    reference, results = check(path, runtimes, feeds, repeats, tolerance)
    print(f"{'runtime':<10} {'relevance':>10} {'worst output':>13} {'ms per run':>11}  verdict")
    print(f"{'ort':<10} {'reference':>10} {'':>13} {reference.seconds * 1e3:>11.2f}  ONNX Runtime Python, CPU")
    for parity in results:
        if parity.failure:
            print(f"{parity.runtime:<10} {'-':>10} {'-':>13} {'-':>11}  FAILED: {parity.failure}")
            continue
        verdict = "ok" if parity.passed(tolerance) else f"DIFFERS (tolerance {tolerance:g})"
        if parity.winner_flips:
            verdict += (
                f": {parity.winner_flips} max-pool window(s) picked another winner, their largest inputs "
                "tied within the runtimes' rounding"
            )
        print(
            f"{parity.runtime:<10} {parity.errors.get('relevance', float('nan')):>10.1e} {parity.worst:>13.1e} "
            f"{parity.seconds * 1e3:>11.2f}  {verdict}"
        )
    failed = [p.runtime for p in results if not p.passed(tolerance)]
    if failed:
        raise RuntimeMismatchError(
            f"{path}: {', '.join(failed)} did not reproduce ONNX Runtime within {tolerance:g} relative L2"
        )


def cmd_inspect(args):
    """The plan of a classifier, node by node; or how an explainer graph was made."""
    proto, label = read_model(args.model)
    if is_explainer(proto):
        print(f"{label}: an lrp-onnx explainer graph")
        for key, value in read_metadata(proto).items():
            print(f"  {key}: {value}")
        return EXIT_OK
    p = plan(args.model, **_conversion(args))
    problems = {name: f"UNSUPPORTED: {reason}" for name, _, reason in p.problems}
    problems.update((name, f"RULE DOES NOT FIT: {reason}") for name, _, reason in p.rule_problems)
    where = (
        f" at its embedding {p.explained.name!r}"
        if p.at_embedding
        else f" at tensor {p.explained.name!r} {list(p.explained.shape or [])}"
        if p.explained is not p.explained_input
        else ""
    )
    print(
        f"{p.label}: explaining input {p.explained_input.name!r} {list(p.explained_input.shape or [])}{where}, "
        f"relevance from {p.logits.name!r}, {'composite ' + p.composite.name if p.method == 'lrp' else p.method}"
        f"{f' ({p.chosen_by})' if p.chosen_by else ''}"
    )
    width = max([len(u.name) for u in p.units] + [4])
    for unit in p.units:
        rule = p.rules.get(unit.name)
        fused = f" (+{', '.join(n.op for n in unit.followers)})" if unit.followers else ""
        what = problems.get(unit.name) or (rule.describe() if rule is not None else "route")
        print(f"  {unit.name:<{width}}  {unit.op + fused:<28}  {what}")
    if p.problems:
        print(f"{len(p.problems)} unsupported node(s): " + ", ".join(f"{n} ({op})" for n, op, _ in p.problems))
    if p.rule_problems:
        print(
            f"{len(p.rule_problems)} node(s) whose rule does not fit: "
            + ", ".join(f"{n} ({op})" for n, op, _ in p.rule_problems)
        )
    if p.path_breaks:
        print(f"relevance from {p.logits.name!r} cannot reach {p.explained.name!r}: {describe_breaks(p.path_breaks)}")
    try:
        p.raise_problems()
    except LrpOnnxError as e:
        return exit_code(e)
    print("all nodes supported")
    return EXIT_OK


def cmd_explain(args):
    if bool(args.text) == bool(args.inputs):
        raise InputError(
            "give INPUT files or --text, not both" if args.text else "nothing to explain: give INPUT files or --text"
        )
    if bool(args.text) != bool(args.tokenizer):
        raise InputError("--text needs --tokenizer" if args.text else "--tokenizer is for --text")
    with _timed(args, "read the model (converted in memory if a classifier) and started ONNX Runtime"):
        explainer = Explainer(args.model, providers=args.provider, threads=args.threads, **_conversion(args))
    labels = read_labels(args.labels) if args.labels else None
    if args.text:
        return _explain_texts(explainer, args, labels)
    with _timed(args, "explained the inputs"):
        totals, summaries = explain_to_folder(
            explainer,
            args.inputs,
            args.output,
            _preprocess(args),
            args.target,
            args.top_k,
            labels,
            args.batch_size,
            args.cmap,
            args.overlay,
            args.json,
            zoom=args.zoom,
            heatmaps=not args.no_heatmaps,
            relevance_dtype=args.relevance_dtype,
            shard_inputs=args.shard_size,
            restart=args.restart,
            fail_fast=args.fail_fast,
            engine=_engine(args),
            progress=not args.quiet,
        )
    resumed = f", {totals.resumed} of them done by the run this one continued" if totals.resumed else ""
    print(
        f"explained {totals.inputs - totals.failed} of {totals.inputs} input(s){resumed}: {totals.explanations} "
        f"explanation(s) in {totals.folder}/ ({'' if args.no_heatmaps else 'heatmaps, '}relevance/, "
        f"{', '.join(summaries)})"
    )
    _print_predictions(os.path.join(totals.folder, "summary.csv"))
    if totals.overflowed:
        print(
            f"lrp-onnx: warning: {totals.overflowed} relevance value(s) lie past float16's range and are stored "
            "as inf; use --relevance-dtype float32",
            file=sys.stderr,
        )
    if totals.failed:
        for name, error in totals.errors:  # the reader's errors name the file already
            print(f"lrp-onnx: error: {error if name in error else f'{name}: {error}'}", file=sys.stderr)
        more = f" ({totals.failed - len(totals.errors)} more not shown)" if totals.failed > len(totals.errors) else ""
        print(
            f"lrp-onnx: {totals.failed} input(s) could not be explained{more}; the error column of "
            f"{totals.folder}/summary.csv says why for each",
            file=sys.stderr,
        )
        return EXIT_SOME_INPUTS_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _timed(args, what):
    """With --verbose, "lrp-onnx: <what> in <seconds> s" on stderr once the step is done."""
    start = time.perf_counter()
    yield
    if args.verbose:
        print(f"lrp-onnx: {what} in {time.perf_counter() - start:.2f} s", file=sys.stderr)


PREDICTIONS_SHOWN = 10  # explain prints the first rows of summary.csv; the file has them all


def _print_predictions(summary_csv):
    """The first rows of the summary: each input's prediction, the class explained, its logit, Σ R."""
    with open(summary_csv, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(PREDICTIONS_SHOWN + 1), csv.DictReader(f))]
    explained = [row for row in rows[:PREDICTIONS_SHOWN] if not row.get("error")]
    width = max([len(row["input"]) for row in explained] + [5])
    for row in explained:
        print(
            f"  {row['input']:<{width}}  predicted {_class(row, 'predicted')}, explained {_class(row, 'target')}: "
            f"logit {float(row['logit']):.4g}, Σ R {float(row['relevance_sum']):.4g}"
        )
    if len(rows) > PREDICTIONS_SHOWN:
        print(f"  ... (every row: {summary_csv})")


def _class(row, key):
    label = row.get(f"{key}_label")
    return f"{row[key]} ({label})" if label and label != row[key] else row[key]


def _engine(args):
    """None for --engine local; the Ray engine with its flags (which are refused without it)."""
    if args.engine == "local":
        given = [
            flag for flag, value in (("--address", args.address), ("--workers", args.workers)) if value is not None
        ]
        given += ["--gpus"] if args.gpus else []
        if given:
            raise InputError(f"{', '.join(given)} apply to --engine ray only")
        return None
    from .distributed import RayEngine  # here, not above: Ray is an extra

    return RayEngine(args.address, args.workers or 1, args.threads or 1, args.gpus)


def _explain_texts(explainer, args, labels):
    explanations = explainer.explain_text(args.text, args.tokenizer, args.target, args.top_k, labels)
    for e in explanations:
        print(token_table(e))
    settings = {
        "explainer": explainer.metadata,
        "texts": args.text,
        "tokenizer": os.path.abspath(args.tokenizer),
        "target": args.target,
        "top_k": args.top_k,
        "labels": labels,
        "cmap": args.cmap,
    }
    folder = args.output or default_run_folder(explainer.label, settings)
    files = write_text_explanations(explanations, folder, args.cmap)
    print(f"wrote {len(explanations)} explanation(s) to {folder}/ ({', '.join(files)})")
    return EXIT_OK


def _add_input_flags(p):
    """How image inputs are made model-ready (explain, evaluate)."""
    p.add_argument(
        "--size",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="resize the shorter side and center-crop: S, or H W (default: the model's fixed size)",
    )
    p.add_argument("--mean", type=_floats, help="per-channel mean to subtract, comma-separated")
    p.add_argument("--std", type=_floats, help="per-channel std to divide by, comma-separated")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        choices=[1.0, 255.0],
        help="pixel range before mean/std: 1 for [0, 1] (default), 255 for [0, 255]",
    )
    p.add_argument("--layout", choices=["nchw", "nhwc"], help="default: read from the model's input shape")
    p.add_argument("--grayscale", action="store_true", help="convert images to grey (repeated if the model wants RGB)")


def _preprocess(args):
    if args.size is not None and len(args.size) > 2:
        raise InputError(f"--size takes S or H W, got {len(args.size)} numbers")
    return Preprocess(
        size=args.size, mean=args.mean, std=args.std, scale=args.scale, layout=args.layout, grayscale=args.grayscale
    )


def _input_spec(model):
    explained = plan(model).explained_input
    return InputSpec(list(explained.shape or []), explained.dtype or np.float32)


def cmd_evaluate(args):
    low, high = _noise_range(args)
    methods = _evaluated_methods(args)
    for spec in methods:
        parse_method(spec)  # a bad spec fails before any work
    spec, preprocess = _input_spec(args.model), _preprocess(args)
    pending = list(read_inputs(args.data, spec, preprocess))  # locators only: each input is read when it is used
    if args.boxes and args.masks:
        raise InputError("give --boxes or --masks as the ground truth, not both")
    boxes = read_boxes(args.boxes, pending) if args.boxes else None
    masks = read_masks(args.masks, pending) if args.masks else None
    writable_folder(args.output)
    results = evaluate(
        args.model,
        pending,
        methods,
        steps=args.steps,
        region=args.region,
        repeats=args.repeats,
        low=low,
        high=high,
        layout=args.layout,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        rule_params=rule_params(args),
        boxes=boxes,
        masks=masks,
        reader=InputReader(spec, preprocess),
    )
    settings = {
        "model": args.model,
        "samples": len(pending),
        "steps": len(results[0].drops) - 1,
        "region": args.region,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    context = context_report(results, [p.name for p in pending]) if boxes or masks else None
    write_json(results, os.path.join(args.output, "evaluate.json"), settings, context)
    plot(results, os.path.join(args.output, "aopc.png"))
    print(report(results))
    for method, shares in (context or {}).items():
        ratio = "infinite" if shares["ratio"] is None else f"{shares['ratio']:.3g}"  # None: nothing positive inside
        print(
            f"{method}: positive relevance inside the ground truth {shares['inside']:.1%}, outside "
            f"{shares['outside']:.1%}, median ratio outside/inside {ratio}"
        )
    print(f"wrote {args.output}/evaluate.json and {args.output}/aopc.png")
    return EXIT_OK


def _noise_range(args):
    """--noise-low/--noise-high. evaluate's --low/--high set them until version 0.1.0; they are
    refused now rather than read as the zbox bounds they are in every other command, which would
    change an old command line's meaning without a word."""
    if args.low is not None or args.high is not None:
        raise InputError(
            "evaluate --low/--high no longer set the noise range: use --noise-low/--noise-high "
            "(--low/--high are zbox bounds in every other command; here, --zbox-low/--zbox-high)"
        )
    return args.noise_low, args.noise_high


def cmd_compare(args):
    spec_a, spec_b = _input_spec(args.model_a), _input_spec(args.model_b)
    layout_a, layout_b = spec_a.layout(args.layout), spec_b.layout()
    preprocess = _preprocess(args)
    pending = list(read_inputs(args.data, spec_a, preprocess))  # locators only: each input is read when it is used
    writable_folder(args.output)
    result = compare(
        args.model_a,
        args.model_b,
        pending,
        layout_a,
        layout_b,
        args.composite,
        args.aopc_steps,
        args.composite_b,
        batch_size=args.batch_size,
        shown=args.grid,
        reader=InputReader(spec_a, preprocess),
        **rule_params(args),
    )
    write_grid(result, layout_a, os.path.join(args.output, "compare.png"))
    write_comparison(result, os.path.join(args.output, "compare.json"), args.model_a, args.model_b)
    print(comparison_report(result, args.model_a, args.model_b))
    print(f"wrote {args.output}/compare.json and {args.output}/compare.png")
    return EXIT_OK


def cmd_export_triton(args):
    from .triton import export_triton  # here, not above: the other commands never need it

    files = export_triton(
        args.model,
        args.repo,
        name=args.name,
        max_batch_size=args.max_batch_size,
        backend=args.backend,
        force=args.force,
    )
    print(f"wrote {', '.join(files)} ({args.backend} backend, max_batch_size {args.max_batch_size})")
    return EXIT_OK


# evaluate's methods unless --method names them: the composite (--composite, auto by default), a
# second one for the model's kind, and two baselines
SECOND_COMPOSITE = {CNN_COMPOSITE: "epsilon-plus-flat", TRANSFORMER_COMPOSITE: "cp-lrp"}
DEFAULT_EVALUATION = ("lrp", "lrp:epsilon-plus-flat or, with attention, lrp:cp-lrp", "sensitivity", "gradient-x-input")


def _evaluated_methods(args):
    """The method specs to evaluate, ``lrp`` and ``lrp:auto`` named by the composite they stand for
    (--composite, or what auto chooses for this model), each once."""
    composite = args.composite
    if composite == AUTO:
        composite = plan(args.model).composite.name
    methods = args.method or [
        f"lrp:{composite}",
        f"lrp:{SECOND_COMPOSITE.get(composite, 'epsilon-plus-flat')}",
        "sensitivity",
        "gradient-x-input",
    ]
    named = [f"lrp:{composite}" if spec in ("lrp", f"lrp:{AUTO}") else spec for spec in methods]
    return list(dict.fromkeys(named))


# One example per command, at the end of its --help (the bundled models and samples)
EXAMPLES = {
    "convert": "lrp-onnx convert models/digits_cnn.onnx -o digits.lrp.onnx --composite epsilon-plus-flat",
    "inspect": "lrp-onnx inspect models/digits_vit.onnx",
    "explain": "lrp-onnx explain models/digits_cnn.onnx models/samples/ --labels models/digits_labels.txt --zoom 16",
    "evaluate": "lrp-onnx evaluate models/digits_cnn.onnx models/digits_samples.npy --steps 20",
    "compare": "lrp-onnx compare models/digits_cnn.onnx models/digits_vit.onnx models/samples/ --aopc-steps 20",
    "check": "lrp-onnx check digits.lrp.onnx --runtime ort-unoptimised --data models/digits_samples.npy",
    "export-triton": "lrp-onnx export-triton digits.lrp.onnx triton-models/ --max-batch-size 16",
}


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are bad input like any other: one line on stderr, exit 2 (not argparse's usage
    block), pointing to the help that has the usage."""

    def error(self, message):
        self.exit(2, f"lrp-onnx: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = OneLineParser(prog="lrp-onnx", description="LRP explainer graphs for ONNX classifiers")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('lrp-onnx')}")
    # --debug and --quiet go before or after the command. In a command's parser their default is
    # SUPPRESS: not given there, they keep the value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    for p, default in ((parser, False), (common, argparse.SUPPRESS)):
        p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
        p.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=default,
            help="print errors and warnings only: no results, no progress bar",
        )
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=default,
            help="also print how long each step took (reading and converting the model, explaining)",
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, **options):
        return sub.add_parser(
            name,
            parents=[common],
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **options,
        )

    p = command("convert", help="write the explainer graph of MODEL")
    p.add_argument("model", help="an ONNX classifier (a .onnx file, with its external data beside it)")
    p.add_argument("-o", "--output", help="output path (default: MODEL.lrp.onnx beside the model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="TENSOR",
        help="also output the relevance at this tensor as relevance:TENSOR (repeatable)",
    )
    p.add_argument("--layer-sum", choices=["channel"], help="sum each --layer output per channel: [N, C]")
    p.add_argument(
        "--external-data",
        action="store_true",
        help=f"save initializers over 1 MiB to OUT{DATA_SUFFIX} beside OUT (automatic past "
        f"{EXTERNAL_DATA_THRESHOLD >> 20} MiB, which ONNX Runtime Web cannot load as one file)",
    )
    p.add_argument(
        "--check-runtime",
        action="extend",
        type=_runtimes,
        metavar="RUNTIME[,RUNTIME]",
        help="then run the explainer on these runtimes against ONNX Runtime (see check); repeatable",
    )
    _add_rule_flags(p)
    p.set_defaults(run=cmd_convert)
    p = command("inspect", help="print each node with the rule it would get; list unsupported nodes")
    p.add_argument("model", help="an ONNX classifier, or an explainer graph (then: how it was made)")
    _add_rule_flags(p)
    p.set_defaults(run=cmd_inspect)
    p = command("explain", help="explain images, folders, arrays or texts: heatmaps, relevance shards, summaries")
    p.add_argument("model", help="an explainer graph, or a classifier (converted in memory)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files (PNG, JPEG, BMP), folders, .npy, .npz")
    p.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="a text to explain (repeatable), for a model that takes token ids; needs --tokenizer",
    )
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (Hugging Face tokenizers) for --text")
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="output folder (default: lrp-out/MODEL-XXXXXXXX, one per model and settings: a run "
        "identical to an earlier one continues it, any other gets its own folder)",
    )
    p.add_argument(
        "--target", help="class index, label name with --labels, or -1 / predicted (the default: the predicted class)"
    )
    p.add_argument("--top-k", type=_positive_int, metavar="K", help="explain the K highest-scoring classes")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="B",
        help="inputs per ONNX Runtime run; memory grows with it, not with the number of inputs",
    )
    p.add_argument("--no-heatmaps", action="store_true", help="write no PNGs: relevance shards and summaries only")
    p.add_argument(
        "--relevance-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="element type of the relevance shards (float16 halves them)",
    )
    p.add_argument(
        "--shard-size",
        type=_positive_int,
        metavar="N",
        help="inputs per relevance shard and part (default: about 64 MiB of relevance, at most 1024)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard what an earlier run left in the output folder, instead of continuing it",
    )
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first input that cannot be explained (default: an error row, and exit 8)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (default): this process; ray: a pool of Ray Data actors (the ray extra)",
    )
    p.add_argument("--address", help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--workers", type=_positive_int, help="--engine ray: actors, each with one session (default 1)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="ONNX Runtime threads (default: ONNX Runtime's choice); "
        "with --engine ray, CPUs and threads per actor (default 1)",
    )
    p.add_argument("--gpus", type=float, default=0, help="--engine ray: GPUs per actor (CUDA); default 0")
    _add_input_flags(p)
    p.add_argument("--cmap", default="bwr", choices=sorted(COLORMAPS), help="heatmap colormap (default bwr)")
    p.add_argument("--overlay", action="store_true", help="blend the heatmap over the input image")
    p.add_argument("--zoom", type=_positive_int, default=1, help="enlarge heatmaps N times (for small inputs)")
    p.add_argument("--json", action="store_true", help="also write summary.json")
    p.add_argument("--provider", choices=["cpu", "cuda"], help="ONNX Runtime device (default: CUDA if available)")
    _add_rule_flags(p, composite_default=None)
    p.set_defaults(run=cmd_explain)
    p = command("evaluate", help="perturbation analysis: AOPC of each method against random")
    p.add_argument("model", help="a classifier")
    p.add_argument("data", nargs="+", metavar="DATA", help="image files, folders, .npy, .npz (model-ready arrays)")
    p.add_argument("-o", "--output", default="lrp-eval", metavar="DIR", help="output folder (default ./lrp-eval)")
    p.add_argument(
        "--method",
        action="append",
        metavar="SPEC",
        help="lrp (--composite's), lrp:COMPOSITE, gradient, sensitivity or gradient-x-input "
        f"(repeatable; default: {', '.join(DEFAULT_EVALUATION)}); random is always included. "
        "The rule flags apply to every lrp method",
    )
    p.add_argument(
        "--composite",
        default=DEFAULT_COMPOSITE,
        type=_composite,
        metavar="NAME",
        help="the composite of method lrp, as in convert (default: auto)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=100,
        help="perturbation steps L (default 100, at most the number of regions)",
    )
    p.add_argument("--region", type=_positive_int, help="region side r in pixels (default 9 at 224 px, scaled)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="noise draws per sample (default 1)")
    p.add_argument("--noise-low", type=float, help="noise range (default: the data's minimum)")
    p.add_argument("--noise-high", type=float, help="noise range (default: the data's maximum)")
    p.add_argument("--low", type=float, help=argparse.SUPPRESS)  # refused: see _noise_range
    p.add_argument("--high", type=float, help=argparse.SUPPRESS)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="B",
        help="perturbed copies scored per ONNX Runtime run (default 256); B // (L+1) inputs are "
        "explained at a time, which sets the memory",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="noise seed; sample i draws from the generator seeded (SEED, i) (default 0)",
    )
    p.add_argument(
        "--boxes",
        metavar="CSV",
        help="ground truth: input, x0, y0, x1, y1 per input (model-input "
        "pixels, end exclusive): report relevance mass accuracy (positive relevance inside and outside), "
        "rank accuracy and the pointing game",
    )
    p.add_argument(
        "--masks",
        metavar="DIR",
        help="ground truth as mask images (nonzero inside), one per input with "
        "the input's file name: the same measures as --boxes",
    )
    _add_rule_flags(p, bounds=(), choose=False)
    _add_input_flags(p)
    p.set_defaults(run=cmd_evaluate)
    p = command("compare", help="explain the same inputs with two models and compare the explanations")
    p.add_argument("model_a", help="an ONNX classifier")
    p.add_argument("model_b", help="another classifier of the same classes (a deployed form of A, say)")
    p.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="image files, folders, .npy, .npz (arrays model-ready for MODEL_A; moved to B's layout)",
    )
    p.add_argument("-o", "--output", default="lrp-compare", metavar="DIR", help="output folder (default ./lrp-compare)")
    p.add_argument(
        "--composite",
        default=DEFAULT_COMPOSITE,
        type=_composite,
        metavar="NAME",
        help="for both models, or for MODEL_A with --composite-b (names as in convert)",
    )
    p.add_argument("--composite-b", type=_composite, metavar="NAME", help="for MODEL_B (default: --composite)")
    p.add_argument(
        "--aopc-steps", type=int, default=100, metavar="L", help="perturbation steps for each model's AOPC (0: skip)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="B",
        help="inputs per ONNX Runtime run; memory grows with it, not with the number of inputs",
    )
    p.add_argument(
        "--grid",
        type=_positive_int,
        default=16,
        metavar="N",
        help="inputs shown in compare.png (default 16; compare.json has every input)",
    )
    _add_rule_flags(p, choose=False)
    _add_input_flags(p)
    p.set_defaults(run=cmd_compare)
    p = command("check", help="run an explainer on other runtimes and compare with ONNX Runtime Python")
    p.add_argument("explainer", help="an explainer graph (lrp-onnx convert)")
    p.add_argument(
        "--runtime",
        action="extend",
        required=True,
        type=_runtimes,
        metavar="RUNTIME[,RUNTIME]",
        help="repeatable: openvino (pip openvino), ort-node (npm onnxruntime-node), ort-web "
        "(npm onnxruntime-web in headless Chromium), ort-unoptimised (ONNX Runtime with graph "
        "optimisations off: the rounding floor)",
    )
    p.add_argument(
        "--data", metavar="ARRAY.npy", help="values of the explained input (default: 2 random samples, standard normal)"
    )
    p.add_argument(
        "--input",
        dest="old_input",
        metavar="ARRAY.npy",
        help="deprecated: --data (--input names a graph input in every other command)",
    )
    p.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help=f"largest relative L2 of any output (default {TOLERANCE:g})"
    )
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs after one warm-up (default 3)")
    p.set_defaults(run=cmd_check)
    p = command("export-triton", help="write an explainer into a Triton Inference Server model repository")
    p.add_argument("model", help="an explainer graph (lrp-onnx convert)")
    p.add_argument("repo", help="the model repository folder (created if missing)")
    p.add_argument("--name", help="model name, the folder REPO/NAME (default: MODEL's file name without .lrp.onnx)")
    p.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="largest batch Triton's dynamic batcher forms (default 8)",
    )
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "python"],
        default="onnxruntime",
        help="onnxruntime: Triton's ORT backend runs the graph (default); python: a model.py hosting "
        "an ONNX Runtime session, for servers without the ORT backend",
    )
    p.add_argument("--force", action="store_true", help="replace an existing REPO/NAME")
    p.set_defaults(run=cmd_export_triton)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings as one line on stderr, like an error; any other warning as Python shows it."""
    if issubclass(category, (ModelWarning, RelevanceWarning)):
        print(f"lrp-onnx: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `lrp-onnx`: what it can do
        parser.print_help()
        return EXIT_OK
    with warnings.catch_warnings():  # restores Python's showwarning when main returns
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args):
    try:
        if args.quiet:  # the files are written as ever; stdout goes nowhere
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                return args.run(args)
        return args.run(args)
    except BrokenPipeError:
        # The reader stopped reading (`lrp-onnx inspect MODEL | head`), which is not a failure. Later
        # writes, and Python's flush at exit, go to devnull instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except LrpOnnxError as e:
        if args.debug:
            raise
        print(f"lrp-onnx: error: {e}", file=sys.stderr)
        return exit_code(e)
    except Exception as e:  # anything else is our bug: still one line, unless --debug
        if args.debug:
            raise
        print(
            f"lrp-onnx: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

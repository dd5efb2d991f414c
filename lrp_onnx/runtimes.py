"""An explainer file on other runtimes, against ONNX Runtime's Python CPU build (``lrp-onnx check``).

Each runtime runs the file on the same feeds and gives its outputs by name and the median seconds
of a run (after one warm-up run):

- ``ort``: ONNX Runtime for Python on the CPU, the reference.
- ``ort-unoptimised``: the same with every graph optimisation off. Fused and unfused kernels round
  differently, so its distance from ``ort`` is the floor any other runtime can be held to.
- ``openvino``: OpenVINO's CPU plug-in (pip ``openvino``), with INFERENCE_PRECISION_HINT=f32: its
  default on CPUs with bf16 units is bf16, which moves relevance by 1e-2 and more.
- ``ort-node``: ONNX Runtime Node (npm ``onnxruntime-node``).
- ``ort-web``: ONNX Runtime Web, WASM, in headless Chromium (Debian's ``chromium``, or the binary
  in LRP_ONNX_CHROMIUM), driven by npm ``playwright-core``.

The npm packages come from the ``node_modules`` folder of LRP_ONNX_NODE_ROOT, else of the current
folder or one above it, else of the lrp-onnx checkout (its package.json pins them: ``npm ci``).
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError, first_line
from .external import external_files
from .plan import TARGET
from .runtime import warn_zero_relevance

JS_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPM_PACKAGES = {"ort-node": ["onnxruntime-node"], "ort-web": ["onnxruntime-web", "playwright-core"]}
TOLERANCE = 1e-5  # relative L2 against ONNX Runtime Python that `check` accepts
ELEMENT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.BOOL: np.bool_,
}


class RuntimeFailure(Exception):
    """The runtime could not load or run the explainer: a finding of the check, not a usage error."""


@dataclass
class Run:
    outputs: dict
    seconds: float  # median of the timed runs


def run_ort(path, feeds, repeats, optimise=True, provider="CPUExecutionProvider"):
    options = ort.SessionOptions()
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=[provider])
    if session.get_providers()[0] != provider:  # ORT falls back to the CPU without a word
        raise RuntimeFailure(f"ONNX Runtime's {provider} did not load (it gave {session.get_providers()})")
    names = [o.name for o in session.get_outputs()]
    return _timed(lambda: dict(zip(names, session.run(None, feeds))), repeats)


def run_ort_unoptimised(path, feeds, repeats):
    return run_ort(path, feeds, repeats, optimise=False)


def run_openvino(path, feeds, repeats):
    try:
        import openvino
    except ImportError:
        raise InputError("the openvino runtime needs the pip package openvino (pip install openvino)") from None
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # compiled(...) keys results by internal port names: look each graph output up by its own name.
    names = [o.name for o in onnx.load(path, load_external_data=False).graph.output]

    def once():
        results = compiled(feeds)
        return {name: np.asarray(results[compiled.output(name)]) for name in names}

    return _timed(once, repeats)


def _timed(run, repeats):
    outputs = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return Run(outputs, float(np.median(times)) if times else None)


def run_ort_node(path, feeds, repeats):
    return _run_node("ort-node", "run_ort_node.mjs", path, feeds, {"repeats": repeats})


def run_ort_web(path, feeds, repeats):
    chromium = os.environ.get("LRP_ONNX_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise InputError("the ort-web runtime needs Chromium: apt-get install chromium, or set LRP_ONNX_CHROMIUM")
    folder = os.path.dirname(os.path.abspath(path))
    extra = {
        "repeats": repeats,
        "threads": os.cpu_count() or 1,
        "externalData": [os.path.relpath(f, folder) for f in external_files(path)],
    }
    return _run_node("ort-web", "run_ort_web.mjs", path, feeds, extra, LRP_ONNX_CHROMIUM=chromium)


def node_root(runtime):
    """The folder whose node_modules holds the npm packages ``runtime`` needs."""
    wanted = NPM_PACKAGES[runtime]
    if os.environ.get("LRP_ONNX_NODE_ROOT"):
        candidates = [os.environ["LRP_ONNX_NODE_ROOT"]]
    else:
        here = os.path.abspath(os.getcwd())
        candidates = [here]
        while os.path.dirname(candidates[-1]) != candidates[-1]:
            candidates.append(os.path.dirname(candidates[-1]))
        candidates.append(CHECKOUT)
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, "node_modules", p, "package.json")) for p in wanted):
            return folder
    raise InputError(
        f"the {runtime} runtime needs the npm package(s) {', '.join(wanted)}: run "
        f"`ONNXRUNTIME_NODE_INSTALL=skip npm ci` in the lrp-onnx checkout, or set LRP_ONNX_NODE_ROOT "
        f"to a folder whose node_modules has them"
    )


def _run_node(runtime, script, path, feeds, extra, **env):
    """Run a JS runner on ``path``: tensors go both ways as raw files described by a JSON request."""
    if not shutil.which("node"):
        raise InputError(f"the {runtime} runtime needs Node.js (node on PATH)")
    root = node_root(runtime)
    with tempfile.TemporaryDirectory(prefix="lrp-onnx-js-") as folder:
        inputs = []
        for k, (name, value) in enumerate(feeds.items()):
            value = np.ascontiguousarray(value)
            file = os.path.join(folder, f"input-{k}.bin")
            value.tofile(file)
            inputs.append(
                {
                    "name": name,
                    "dtype": value.dtype.name.replace("bool_", "bool"),
                    "shape": list(value.shape),
                    "file": file,
                }
            )
        request = os.path.join(folder, "request.json")
        with open(request, "w") as f:
            json.dump({"model": os.path.abspath(path), "inputs": inputs, "folder": folder, **extra}, f)
        done = subprocess.run(
            ["node", os.path.join(JS_FOLDER, script), request],
            capture_output=True,
            text=True,
            env={**os.environ, "LRP_ONNX_NODE_ROOT": root, **env},
        )
        if done.returncode:
            raise RuntimeFailure(f"{runtime}: {_js_error(done.stderr)}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        outputs = {o["name"]: np.fromfile(o["file"], dtype=o["dtype"]).reshape(o["shape"]) for o in result["outputs"]}
    return Run(outputs, result["seconds"])


def _js_error(stderr):
    """The line of a Node error report that says what went wrong, without the stack and framing."""
    noise = ("at ", "node:", "^", "triggerUncaughtException", "Node.js", "name:", "log:", "}", "{")
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return first_line(lines[0] if lines else "exited without a message")


RUNTIMES = {
    "ort": run_ort,
    "ort-unoptimised": run_ort_unoptimised,
    "openvino": run_openvino,
    "ort-node": run_ort_node,
    "ort-web": run_ort_web,
}


def sample_feeds(path, batch=2, seed=0):
    """Feeds for every input of the explainer at ``path``: floats standard normal (as normalised
    images), token ids 0 or 1, attention masks 1, the target −1 (the predicted class). Symbolic axes
    get ``batch``. (Uniform [0, 1) images left a random-init vgg11_bn so ill-conditioned under
    epsilon-plus-flat that ONNX Runtime with and without graph optimisations differed by 1.7e-4.)"""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in onnx.load(path, load_external_data=False).graph.input:
        tensor = value.type.tensor_type
        dtype = ELEMENT_TYPES.get(tensor.elem_type)
        if dtype is None:
            raise InputError(f"{path}: input {value.name!r} has an element type sample_feeds cannot fill")
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor.shape.dim]
        if value.name == TARGET:
            feeds[value.name] = np.full(shape, -1, dtype)
        elif np.dtype(dtype).kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = (np.ones(shape) if "mask" in value.name else rng.integers(0, 2, shape)).astype(dtype)
    return feeds


@dataclass
class Parity:
    """One runtime against ONNX Runtime Python: relative L2 per output, or why it did not run."""

    runtime: str
    errors: dict = field(default_factory=dict)
    seconds: Optional[float] = None
    failure: Optional[str] = None
    # max-pool windows whose winner differs from the reference's (counted where the relevance differs)
    winner_flips: Optional[int] = None

    @property
    def worst(self):
        return max(self.errors.values()) if self.errors else None

    def passed(self, tolerance=TOLERANCE):
        return self.failure is None and self.worst is not None and self.worst <= tolerance


def relative_l2(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        return float("inf")
    scale = np.linalg.norm(reference)
    return float(np.linalg.norm(ours - reference) / (scale if scale else 1.0))


def check(path, runtimes, feeds=None, repeats=3, tolerance=TOLERANCE):
    """(reference Run on ONNX Runtime Python, [Parity per runtime]) for the explainer at ``path``.
    Where a runtime's relevance is more than ``tolerance`` off, its Parity counts the max-pool
    windows in which it picked another winner than the reference."""
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise InputError(f"unknown runtime(s) {unknown}; choose from {sorted(RUNTIMES)}")
    feeds = sample_feeds(path) if feeds is None else feeds
    reference = run_ort(path, feeds, repeats)
    warn_zero_relevance(reference.outputs, path)
    results = []
    for runtime in runtimes:
        try:
            run = RUNTIMES[runtime](path, feeds, repeats)
        except RuntimeFailure as e:
            results.append(Parity(runtime, failure=str(e)))
            continue
        except InputError:
            raise
        except Exception as e:  # the runtime's own refusal (OpenVINO raises RuntimeError and more)
            results.append(Parity(runtime, failure=f"{runtime}: {first_line(e)}"))
            continue
        missing = sorted(set(reference.outputs) - set(run.outputs))
        errors = {
            name: relative_l2(run.outputs[name], value)
            for name, value in reference.outputs.items()
            if name in run.outputs
        }
        parity = Parity(runtime, errors, run.seconds, f"{runtime}: missing outputs {missing}" if missing else None)
        if parity.failure is None and errors.get("relevance", 0.0) > tolerance:
            parity.winner_flips = max_pool_winner_flips(path, feeds, runtime)
        results.append(parity)
    return reference, results


def max_pool_winner_flips(path, feeds, runtime):
    """How many windows of the model's max pools have another winner (first maximum) on ``runtime``
    than on the reference, judged from each pool's input as that runtime computes it.

    Winner-take-all is discontinuous: where a window's two largest inputs are nearer each other than
    two runtimes' convolutions round apart, each picks its own winner and the window's relevance
    lands on another pixel, however exactly both run the explainer. A relevance difference with no
    flipped window is the explainer's (or the runtime's) fault; one with flips may be rounding."""
    proto = onnx.load(path, load_external_data=False)
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    if not pools:
        return 0
    dtype = next(o.type.tensor_type.elem_type for o in proto.graph.output if o.name == "relevance")
    shown = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(t for n in pools for t in (n.input[0], n.output[0])):
        if name not in shown:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    # beside the explainer, so that its external data (a relative location) is found
    handle, probe = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    try:
        onnx.save(proto, probe)
        theirs = RUNTIMES[runtime](probe, feeds, 0).outputs
        ours = run_ort(probe, feeds, 0).outputs
    finally:
        os.remove(probe)
    return sum(
        int(
            np.count_nonzero(
                _window_winners(n, ours[n.input[0]], ours[n.output[0]].shape)
                != _window_winners(n, theirs[n.input[0]], ours[n.output[0]].shape)
            )
        )
        for n in pools
    )


def _window_winners(node, x, out_shape):
    """The flat kernel offset of each window's first maximum, [N, C, out…] (MaxPool's semantics:
    padding is −inf, so it never wins)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides, dilations = list(attrs.get("strides", [1] * rank)), list(attrs.get("dilations", [1] * rank))
    spans = [(k - 1) * d + s * (o - 1) + 1 for k, d, s, o in zip(kernel, dilations, strides, out_shape[2:])]
    auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
    if auto_pad == "NOTSET":
        begin = list(attrs.get("pads", [0] * 2 * rank))[:rank]
    else:  # SAME_UPPER puts the odd padding row at the end, SAME_LOWER at the beginning; VALID none
        total = [max(span - n, 0) for span, n in zip(spans, x.shape[2:])]
        begin = (
            [0] * rank if auto_pad == "VALID" else [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        )
    ends = [max(span - p - n, 0) for span, p, n in zip(spans, begin, x.shape[2:])]
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, ends)), constant_values=-np.inf)
    views = [
        padded[
            (slice(None), slice(None))
            + tuple(
                slice(i * d, i * d + s * (o - 1) + 1, s) for i, d, s, o in zip(index, dilations, strides, out_shape[2:])
            )
        ]
        for index in np.ndindex(*kernel)
    ]
    return np.argmax(np.stack(views, axis=-1), axis=-1)

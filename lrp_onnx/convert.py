"""Build the explainer: seed = logit ⊙ onehot(target), then one reverse walk over the units.

file → canonical graph (load.py) → units (graph.py) → rule per unit (composites.py)
     → explainer graph (propagators in ops/) → checked ModelProto
"""

import fnmatch
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .builder import Builder
from .composites import Composite, GradientComposite, make_composite
from .errors import InputError, LrpOnnxError, RuleError, UnsupportedModelError, UnsupportedOpError, first_line
from .external import without_large_weights
from .graph import carries_relevance, find_units, nonnegative_tensors
from .load import import_graph, load_model
from .precision import restore_half_boundary, upcast_types
from .registry import lookup

TARGET = "target"
RELEVANCE = "relevance"
RELEVANCE_SEED = "relevance_seed"
EXPLAINED_CLASS = "explained_class"
EXPLAINED_LOGIT = "explained_logit"
LAYER_PREFIX = "relevance:"  # relevance:NAME, the relevance at tensor NAME (convert(layers=...))
LAYER_SUMS = ("channel",)
# What the relevance output holds: LRP, or a baseline built by the same walk with the chain rule
METHODS = ("lrp", "gradient", "sensitivity", "gradient-x-input")
# Normalisations of the whole score row: relevance starts below them, at the logits. (An
# elementwise Sigmoid is not one of them: it passes relevance on like any activation.)
SOFTMAX_OPS = ("Softmax", "LogSoftmax", "Normalizer")
SCORE_RESHAPES = ("Identity", "Reshape", "Flatten", "Squeeze")
META_PREFIX = "lrp_onnx."


@dataclass
class Plan:
    """What the converter decided, before emitting anything: shown by ``inspect``."""
    graph: gs.Graph
    label: str
    explained: gs.Variable
    score: gs.Tensor        # the [N, classes] output
    logits: gs.Tensor       # where relevance starts: the score, or the input of a final softmax
    units: list             # units upstream of the logits, topological order, each with its role
    rules: dict             # unit name -> Rule or None
    problems: list          # [(node name, op, reason)]
    composite: Composite
    method: str
    output_types: dict      # graph output name -> the original TypeProto (sequence and map types included)
    upcast: dict            # graph input/output name -> the float16/bfloat16 type it had (precision.py)


def _is_float(t):
    return t.dtype is not None and carries_relevance(t)


def pick_input(graph, label, input_name=None):
    if input_name is not None:
        match = [t for t in graph.inputs if t.name == input_name]
        if not match:
            raise UnsupportedModelError(f"{label}: no graph input named {input_name!r}; inputs are "
                                        f"{[t.name for t in graph.inputs]}")
        if not _is_float(match[0]):
            raise UnsupportedModelError(f"{label}: input {input_name!r} is not a float tensor")
        return match[0]
    floats = [t for t in graph.inputs if _is_float(t)]
    if not floats:
        raise UnsupportedModelError(f"{label}: the graph has no float input to explain; inputs are "
                                    f"{[(t.name, str(t.dtype)) for t in graph.inputs]}")
    return floats[0]


def find_logits(graph, label):
    """The score output [N, classes] and the tensor relevance starts from (before a final softmax)."""
    # skl2onnx's ZipMap turns the probabilities into a list of {class: p}: explain its input.
    scores = [t.inputs[0].inputs[0] if t.inputs and t.inputs[0].op == "ZipMap" else t for t in graph.outputs]
    floats = [t for t in scores if carries_relevance(t)]
    if not floats:
        raise UnsupportedModelError(f"{label}: the graph has no float output to explain")
    score = floats[0]
    if score.shape is not None and (len(score.shape) < 2 or any(d != 1 for d in score.shape[2:])):
        raise UnsupportedModelError(f"{label}: output {score.name!r} has shape {list(score.shape)}; "
                                    "lrp-onnx explains a [N, classes] score tensor (or [N, classes, 1, ...])")
    # Relevance starts below a final softmax. Opset upgrades wrap an old 4-D Softmax in
    # Flatten/Reshape, so walk through shape-only ops too, but stop at the score unless a softmax
    # lies above them.
    logits, tensor = score, score
    while tensor.inputs and tensor.inputs[0].op in SOFTMAX_OPS + SCORE_RESHAPES:
        op, tensor = tensor.inputs[0].op, tensor.inputs[0].inputs[0]
        if op in SOFTMAX_OPS:
            logits = tensor
    return score, logits


def _upstream_of(units, logits):
    """Units that relevance can reach from the logits; the others (a final Softmax, the inside of
    a gate) get none and need no propagator."""
    needed, keep = {logits.name}, []
    for unit in reversed(units):
        if any(t.name in needed for t in unit.outputs):
            keep.append(unit)
            prop = lookup(unit)
            receiving = prop.receiving(unit) if prop else unit.relevant
            needed.update(t.name for t, rel in zip(unit.inputs, receiving) if rel)
    return keep[::-1]


def plan(model, composite="alpha-beta", *, input_name=None, rules=None, method="lrp", **rule_params):
    """Load the model and decide every unit's rule, listing every node that cannot be explained.

    ``method`` other than "lrp" replaces the composite by the chain rule everywhere."""
    if method not in METHODS:
        raise RuleError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "lrp":
        composite = make_composite(composite, **rule_params)
        if rules:
            composite = composite.with_overrides(rules)
    elif rules or any(v is not None for v in rule_params.values()):
        raise RuleError(f"method {method!r} has no rules; composite parameters and rules apply to method lrp")
    else:
        composite = GradientComposite()
    proto, label = load_model(model)
    graph = import_graph(proto)
    explained = pick_input(graph, label, input_name)
    score, logits = find_logits(graph, label)
    units = _upstream_of(find_units(graph, explained, graph.outputs), logits)
    nonnegative = nonnegative_tensors(graph)
    rules_by_unit, problems = {}, []
    first_seen = False
    for unit in units:
        prop = lookup(unit)
        if prop is None:
            problems.append((unit.name, unit.op, "no propagator for this op"))
            continue
        reason = prop.problem(unit)
        if reason:
            problems.append((unit.name, unit.op, reason))
            continue
        role = unit.role = prop.role_of(unit)
        unit.x_nonnegative = unit.inputs[0].name in nonnegative
        is_first = role in ("conv", "dense") and not first_seen
        first_seen = first_seen or is_first
        rules_by_unit[unit.name] = composite.rule_for(unit, role, is_first)
    _check_overrides(composite, units)
    output_types = {o.name: o.type for o in proto.graph.output}
    return Plan(graph, label, explained, score, logits, units, rules_by_unit, problems, composite, method,
                output_types, upcast_types(proto))


def _check_overrides(composite, units):
    for pattern, _ in composite.overrides:
        if not any(pattern == u.op or fnmatch.fnmatchcase(u.name, pattern) for u in units):
            raise RuleError(f"rule override {pattern!r} matches no explained node name or op type")


def convert(model, composite="alpha-beta", *, input_name=None, rules=None, seed_input=False, layers=(),
            layer_sum=None, method="lrp", **rule_params) -> onnx.ModelProto:
    """The explainer of ``model`` (a path, bytes or ModelProto) as a checked ModelProto.

    Inputs: the original inputs plus ``target`` (int64 [N], -1 = predicted class); with
    ``seed_input=True`` a float ``relevance_seed`` shaped like the scores replaces the one-hot seed.
    Outputs: the original outputs plus ``relevance`` (float32, the explained input's shape), and
    ``relevance:NAME`` for each tensor NAME in ``layers``, shaped like it or, with
    ``layer_sum="channel"``, summed to [N, channels]. A float16 or bfloat16 model is explained in
    float32 (precision.py): float16 inputs and outputs stay float16, bfloat16 ones become float32.

    ``method``: "lrp", or a baseline in the same output: "gradient" ∂f/∂x, "sensitivity"
    (∂f/∂x)², "gradient-x-input" x·∂f/∂x (f the target's logit; the seed is the one-hot).
    """
    p = plan(model, composite, input_name=input_name, rules=rules, method=method, **rule_params)
    if p.problems:
        raise UnsupportedOpError(p.problems)
    graph = p.graph
    for name in (TARGET, RELEVANCE, RELEVANCE_SEED, EXPLAINED_CLASS, EXPLAINED_LOGIT):
        if name in graph.tensors():
            raise UnsupportedModelError(f"{p.label}: the model already has a tensor named {name!r}")
    layers = _check_layers(p, layers, layer_sum)
    b = Builder(graph)
    with b.scope("seed"):
        seed, extra_inputs, seed_outputs = _seed(b, p.logits, seed_input, gradient=method != "lrp")
    relevance, at_layers = reverse_walk(b, p, seed, layers)
    with b.scope("method"):
        if method == "sensitivity":
            relevance = b.mul(relevance, relevance)
        elif method == "gradient-x-input":
            relevance = b.mul(relevance, p.explained)
    extra_outputs = {RELEVANCE: (relevance, np.float32, p.explained.shape), **seed_outputs}
    with b.scope("layers"):
        for name, tensor in layers.items():
            r = at_layers[name] if name in at_layers else b.zeros_like(tensor)
            if layer_sum == "channel" and len(tensor.shape) > 2:
                r = b.op("ReduceSum", r, b.ints(list(range(2, len(tensor.shape)))), keepdims=0)
            shape = tensor.shape[:2] if layer_sum == "channel" else tensor.shape
            extra_outputs[LAYER_PREFIX + name] = (r, np.float32, shape)
    if p.score.name not in {t.name for t in graph.outputs}:
        # behind a ZipMap: the scores as a tensor too, for ranking classes (ML ops' outputs are float)
        p.score.dtype = p.score.dtype or np.float32
        p.score.shape = p.score.shape or p.logits.shape or ["N", "classes"]
        graph.outputs.append(p.score)
    graph.inputs.extend(extra_inputs)
    for name, (tensor, dtype, shape) in extra_outputs.items():
        out = gs.Variable(name, dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[tensor], outputs=[out]))
        graph.outputs.append(out)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = max(out.ir_version, 8)
    for output in out.graph.output:  # graphsurgeon knows only tensor types: restore ZipMap's map type
        if output.name in p.output_types:
            output.type.CopyFrom(p.output_types[output.name])
    restore_half_boundary(out, p.upcast)
    meta = {"explained_input": p.explained.name, "composite": p.composite.name,
            "score_output": p.score.name, "method": method}
    for key, value in meta.items():
        out.metadata_props.add(key=META_PREFIX + key, value=value)
    try:
        without_large_weights(lambda shell: onnx.checker.check_model(shell, full_check=True), out)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        # The model passed the same check, so its graph holds something the checker missed there
        # (a weight whose rank contradicts an attribute, say) that the explainer's ops expose.
        raise UnsupportedModelError(f"{p.label}: the explainer fails the ONNX checker ({first_line(e)}); "
                                    "the model is likely inconsistent: if ONNX Runtime runs it, please report this") from None
    return out


def _seed(b, logits, seed_input, gradient=False):
    """R at the logits: logits ⊙ onehot(target), target -1 meaning argmax; or a given seed tensor.
    For the gradient methods, ∂f/∂logits: onehot(target) itself.

    Returns the seed, the new graph inputs, and the new outputs besides ``relevance``: the class
    explained per sample (target with -1 resolved) and its logit, Σ R's reference value.
    """
    batch = logits.shape[0] if logits.shape is not None else "N"
    if seed_input:
        seed = gs.Variable(RELEVANCE_SEED, dtype=np.float32, shape=logits.shape)
        return seed, [seed], {}
    target = gs.Variable(TARGET, dtype=np.int64, shape=[batch])
    scores = logits  # [N, classes]; Caffe2 models end in [N, classes, 1, 1]
    if logits.shape is None or len(logits.shape) != 2:
        logits = b.op("Flatten", logits, axis=1)
    predicted = b.op("ArgMax", logits, axis=1, keepdims=0)
    chosen = b.op("Where", b.op("Less", target, b.ints(0)), predicted, target)
    classes = b.op("Gather", b.shape(logits), b.ints([1]))
    onehot = b.op("OneHot", chosen, classes, b.const([0.0, 1.0]), axis=-1)
    chosen_logit = b.op("ReduceSum", b.mul(logits, onehot), b.ints([1]), keepdims=0)
    seed = onehot if gradient else b.mul(logits, onehot)
    if logits is not scores:
        seed = b.reshape_like(seed, scores)
    return seed, [target], {EXPLAINED_CLASS: (chosen, np.int64, [batch]),
                            EXPLAINED_LOGIT: (chosen_logit, np.float32, [batch])}


def _check_layers(p, names, layer_sum):
    """{name: tensor} of the requested layers, each a float tensor on the explained path that some
    unit hands relevance to (not one inside a merged Conv+BatchNorm unit, say)."""
    if layer_sum not in (None,) + LAYER_SUMS:
        raise RuleError(f"layer_sum must be one of {LAYER_SUMS} or None; got {layer_sum!r}")
    reachable = {t.name: t for u in p.units for t in u.outputs}
    reachable[p.explained.name] = p.explained
    merged = {t.name: u.name for u in p.units if u.followers for node in [u.head] + u.followers[:-1]
              for t in node.outputs}
    layers = {}
    for name in names:
        if name in merged:
            raise InputError(f"{p.label}: layer {name!r} is inside the merged unit {merged[name]!r} "
                             "(a linear layer and its BatchNorm or bias); ask for the unit's output")
        if name not in reachable:
            where = "no such tensor" if name not in p.graph.tensors() else "not on the explained path"
            raise InputError(f"{p.label}: layer {name!r}: {where}")
        tensor = reachable[name]
        if layer_sum == "channel" and tensor.shape is None:
            raise InputError(f"{p.label}: layer {name!r} has no known rank to sum per channel")
        layers[name] = tensor
    return layers


def reverse_walk(b, p, seed, layers=()):
    """Visit units in reverse topological order; sum each tensor's fan-out relevance once.

    Returns the relevance at the explained input, and at each tensor named in ``layers`` that
    received any."""
    contributions = defaultdict(list)
    contributions[p.logits.name].append(seed)
    at_layers = {}
    for unit in reversed(p.units):
        relevance_out = [b.total(contributions.pop(t.name)) if t.name in contributions else None
                         for t in unit.outputs]
        at_layers.update((t.name, r) for t, r in zip(unit.outputs, relevance_out) if t.name in layers and r is not None)
        if all(r is None for r in relevance_out):
            continue
        with b.scope(unit.name):
            try:
                relevance_in = lookup(unit).fn(b, unit, relevance_out, p.rules[unit.name])
            except LrpOnnxError:
                raise
            except Exception as e:  # a propagator bug must still name the node it failed on
                raise UnsupportedModelError(f"node {unit.name!r} ({unit.op}): {type(e).__name__}: {e}") from e
        for t, r, rel in zip(unit.inputs, relevance_in, unit.relevant):
            if r is not None and rel:
                contributions[t.name].append(r)
    found = contributions.get(p.explained.name)
    relevance = b.total(found) if found else b.zeros_like(p.explained)
    if p.explained.name in layers:
        at_layers[p.explained.name] = relevance
    return relevance, at_layers

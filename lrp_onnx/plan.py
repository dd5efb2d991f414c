"""Plan a conversion: load the model, find the explained input and the logits, group the units,
and give every unit its propagator and rule, listing every node that cannot be explained.

Everything that can be checked before emitting is checked here, so ``inspect`` (which prints a
plan) and ``convert`` (which emits it, emit.py) agree on every node.
"""

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from . import ops  # noqa: F401  (registers every propagator)
from .composites import (
    AUTO,
    CNN_COMPOSITE,
    DEFAULT_COMPOSITE,
    METHODS,
    TRANSFORMER_COMPOSITE,
    Composite,
    Overrides,
    composite_name,
    gradient_composite,
    make_composite,
)
from .errors import RelevancePathError, RuleError, UnsupportedModelError, UnsupportedOpError
from .external import HeldWeights
from .graph import SMALL_INTEGERS, carries_relevance, casts_to_float, find_units, is_constant, nonnegative_tensors
from .load import ModelSource, import_graph, load_model, source_digest
from .precision import upcast_types
from .quantized import MIRROR, mirrored
from .registry import lookup, receiving
from .rules import Rule, RuleParams

TARGET = "target"
RELEVANCE = "relevance"
RELEVANCE_SEED = "relevance_seed"
EXPLAINED_CLASS = "explained_class"
EXPLAINED_LOGIT = "explained_logit"
# Names the explainer adds: a model that already uses one cannot be converted.
ADDED_NAMES = (TARGET, RELEVANCE, RELEVANCE_SEED, EXPLAINED_CLASS, EXPLAINED_LOGIT)
# Normalisations of the whole score row: relevance starts below them, at the logits. (An
# elementwise Sigmoid is not one of them: it passes relevance on like any activation.)
SOFTMAX_OPS = ("Softmax", "LogSoftmax", "Normalizer")
SCORE_RESHAPES = ("Identity", "Reshape", "Flatten", "Squeeze")


@dataclass
class Plan:
    """What the converter decided, before emitting anything: shown by ``inspect``."""

    graph: gs.Graph
    label: str
    explained_input: gs.Variable  # the graph input explained
    explained: gs.Variable  # where relevance is gathered: that input, for token ids their embedding, or inside
    at_embedding: bool  # explained is the token ids' embedding: relevance is summed over its last axis
    score: gs.Tensor  # the [N, classes] output
    logits: gs.Tensor  # where relevance starts: the score, or the input of a final softmax
    predicted: gs.Tensor  # the model's own logits, whose argmax is the class explained by default (logits
    # differ where the relevance pass reads a float mirror: quantized.py, precision.py)
    units: list  # units upstream of the logits, topological order, each with its role
    rules: dict  # unit name -> Rule, for the units that take one
    problems: list  # [(node name, op, reason)]: nodes that cannot be explained (by this method)
    rule_problems: list  # [(node name, op, reason)]: nodes whose rule does not fit them
    path_breaks: list  # [(node name, op, reason)]: where relevance stops short of the explained input
    composite: Composite
    method: str
    output_types: dict  # graph output name -> the original TypeProto (sequence and map types included)
    upcast: dict  # graph input/output name -> the bfloat16 type it had (precision.py; float16 stays)
    source_sha256: Optional[str]
    held: HeldWeights  # the large weights, out of the graph's protos (external.py)
    chosen_by: str = ""  # why composite "auto" chose the composite (auto_composite); "" when it was named

    def raise_problems(self) -> None:
        """The errors ``convert`` raises: unsupported nodes first, then rules that do not fit, then
        a relevance path that breaks before the explained input."""
        if self.problems:
            raise UnsupportedOpError(self.problems)
        if self.rule_problems:
            listed = "; ".join(f"node {name!r} ({op}): {why}" for name, op, why in self.rule_problems)
            raise RuleError(f"{len(self.rule_problems)} node(s) with a rule that does not fit: {listed}")
        if self.path_breaks:
            raise RelevancePathError(
                f"{self.label}: relevance from {self.logits.name!r} cannot reach "
                f"{self.explained.name!r}: {describe_breaks(self.path_breaks)}"
            )


def _is_float(t):
    return t.dtype is not None and carries_relevance(t)


def pick_input(graph, label, input_name=None):
    """(the graph input fed, the tensor relevance is gathered at, whether that is the input's embedding).

    A float input is explained itself, and so is an integer image (pixels a Cast turns into
    floats: relevance at a pixel is its value's). Integer token ids (BERT's ``input_ids``) carry no
    relevance: they are explained at the output of their embedding lookup, Gather(constant table,
    ids), as LXT explains at ``inputs_embeds``. Without ``input_name``: the first float input, else
    the first image, else the token ids (``input_ids``, or the one integer input that feeds an
    embedding). ``input_name`` may also name a float tensor inside the graph: relevance is given
    there, and the graph input fed is the one it depends on, chosen as above."""
    if input_name is not None and input_name not in {t.name for t in graph.inputs}:
        return _inner_input(graph, label, input_name)
    candidates = (
        [t for t in graph.inputs if t.name == input_name] if input_name is not None else _default_inputs(graph.inputs)
    )
    if not candidates:
        inputs = [(t.name, str(t.dtype)) for t in graph.inputs]
        raise UnsupportedModelError(
            f"{label}: the graph has no float input, nor token ids feeding an embedding, nor "
            f"an 8-bit image, to explain; inputs are {inputs}"
        )
    chosen = candidates[0]
    if _is_float(chosen) or _is_image(chosen):
        return chosen, chosen, False
    embeddings = _embedding_of(chosen)
    if len(embeddings) != 1:
        raise UnsupportedModelError(
            f"{label}: input {chosen.name!r} is not a float tensor, nor token ids feeding one embedding lookup (a "
            f"Gather on axis 0 of a constant float table, or of an integer one that a DequantizeLinear reads), nor "
            f"an 8- or 16-bit image read by a Cast to float; "
            f"it feeds {len(embeddings)} embedding lookups"
        )
    return chosen, embeddings[0], True


def _default_inputs(inputs):
    """The inputs that may be explained, in the order they are chosen: floats, images, token ids."""
    floats = [t for t in inputs if _is_float(t)]
    images = [t for t in inputs if _is_image(t)]
    tokens = sorted((t for t in inputs if _embedding_of(t)), key=lambda t: t.name != "input_ids")
    return floats + images + tokens


def _is_image(t):
    """An 8- or 16-bit integer tensor (uint8 pixels, which carry relevance) that a Cast turns into
    floats, and no embedding reads. Wider integers are ids and indices, not values."""
    return (
        t.dtype is not None
        and np.dtype(t.dtype).name in SMALL_INTEGERS
        and not _embedding_of(t)
        and any(casts_to_float(n) for n in t.outputs)
    )


def _inner_input(graph, label, name):
    """``pick_input`` for a tensor inside the graph: it, and the graph input it depends on."""
    tensor = graph.tensors().get(name)
    if tensor is None or is_constant(tensor) or not _is_float(tensor):
        what = (
            "no graph input and no tensor of the graph"
            if tensor is None
            else "not a float tensor computed from an input"
        )
        raise UnsupportedModelError(
            f"{label}: the explained input {name!r} names {what}; graph inputs are "
            f"{[t.name for t in graph.inputs]}, or name a float tensor inside the graph"
        )
    upstream = [t for t in _default_inputs(graph.inputs) if between(graph, t, tensor) is not None]
    if not upstream:
        raise UnsupportedModelError(f"{label}: tensor {name!r} depends on no graph input that can be explained")
    return upstream[0], mirrored(graph, tensor), False


def _embedding_of(t):
    """The embeddings that integer tensor ``t`` looks up: the output of each Gather(constant [vocab, D]
    table, t) on axis 0, of a float table, or of an integer one that a DequantizeLinear reads (ONNX
    Runtime's dynamic quantizer keeps the table in int8): then that dequantized output."""
    if t.dtype is None or np.dtype(t.dtype).kind not in "iu":
        return []
    embeddings = []
    for n in t.outputs:
        if not (
            n.op == "Gather"
            and len(n.inputs) == 2
            and n.inputs[1] is t
            and n.attrs.get("axis", 0) == 0
            and is_constant(n.inputs[0])
            and n.inputs[0].values.ndim == 2
        ):
            continue
        rows, kind = n.outputs[0], n.inputs[0].values.dtype.kind
        if kind == "f":
            embeddings.append(rows)
        elif kind in "iu" and len(rows.outputs) == 1 and rows.outputs[0].op == "DequantizeLinear":
            embeddings.append(rows.outputs[0].outputs[0])
    # the model's own lookup where a float mirror's stands in for it (quantized.py, precision.py) is not a second one
    found = {e.name for e in embeddings}
    return [e for e in embeddings if e.name + MIRROR not in found]


def find_logits(graph, label):
    """The score output [N, classes] and the tensor relevance starts from (before a final softmax)."""
    # skl2onnx's ZipMap turns the probabilities into a list of {class: p}: explain its input.
    scores = [t.inputs[0].inputs[0] if t.inputs and t.inputs[0].op == "ZipMap" else t for t in graph.outputs]
    floats = [t for t in scores if carries_relevance(t)]
    if not floats:
        raise UnsupportedModelError(f"{label}: the graph has no float output to explain")
    score = floats[0]
    if score.shape is not None and (len(score.shape) < 2 or any(d != 1 for d in score.shape[2:])):
        raise UnsupportedModelError(
            f"{label}: output {score.name!r} has shape {list(score.shape)}; "
            "lrp-onnx explains a [N, classes] score tensor (or [N, classes, 1, ...])"
        )
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
    """Units that relevance can reach from the logits, and the names of the tensors it reaches; the
    other units (a final Softmax, the inside of a gate) get none and need no propagator."""
    needed, keep = {logits.name}, []
    for unit in reversed(units):
        if any(t.name in needed for t in unit.outputs):
            keep.append(unit)
            needed.update(t.name for t, rel in zip(unit.inputs, receiving(unit)) if rel)
    return keep[::-1], needed


def between(graph, source, target):
    """Names of the tensors on some path from tensor ``source`` to tensor ``target`` through the
    graph's nodes, whatever their types; None if ``target`` does not depend on ``source``."""
    downstream = {source.name}
    for node in graph.nodes:  # topological order
        if any(t.name in downstream for t in node.inputs):
            downstream.update(t.name for t in node.outputs)
    if target.name not in downstream:
        return None
    on_path = {target.name}
    for node in reversed(graph.nodes):
        if any(t.name in on_path for t in node.outputs):
            on_path.update(t.name for t in node.inputs if t.name in downstream)
    return on_path


def path_breaks(graph, explained, logits, units, reached):
    """[(node name, op, reason)] where relevance flowing back from ``logits`` stops short of
    ``explained`` ([] where it reaches it; ``reached`` from ``_upstream_of``): on every path between
    them, the first node from the input that takes relevance-carrying input and hands none on,
    because its output on the path carries none (an int8 QuantizeLinear output, an ArgMax) or its
    propagator passes none to that input."""
    if explained.name in reached:
        return []
    on_path = between(graph, explained, logits)
    if on_path is None:
        return [
            (
                logits.inputs[0].name if logits.inputs else logits.name,
                logits.inputs[0].op if logits.inputs else "input",
                f"the output {logits.name!r} does not depend on {explained.name!r}",
            )
        ]
    carrying = {explained.name} | {t.name for u in units for t in u.outputs if carries_relevance(t)}
    receivers = {u.name: receiving(u) for u in units}
    breaks = []
    for node in graph.nodes:
        fed = [t for t in node.inputs if t.name in carrying and t.name in on_path]
        onward = [t for t in node.outputs if t.name in on_path]
        if not fed or not onward:
            continue
        if node.name not in receivers:
            kinds = ", ".join(f"{t.name!r} is {_type_name(t)}" for t in onward)
            breaks.append((node.name, node.op, f"its output {kinds}, which carries no relevance"))
            continue
        dropped = [t for t, gets in zip(node.inputs, receivers[node.name]) if t.name in carrying and not gets]
        if len(dropped) == len(fed):
            breaks.append((node.name, node.op, f"it passes no relevance to its input {dropped[0].name!r}"))
    return breaks or [(logits.name, "output", "no relevance-carrying path joins them")]


def _type_name(t):
    return np.dtype(t.dtype).name if t.dtype is not None else "of unknown type"


def describe_breaks(breaks):
    return "; ".join(f"relevance stops at node {name!r} ({op}): {why}" for name, op, why in breaks)


# Products of two activations, by the positions of their two operands: attention's q·kᵀ and
# weights·v (a weight is a constant, or a quantized constant)
ACTIVATION_PRODUCTS = {"MatMul": (0, 1), "Einsum": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


def auto_composite(graph):
    """(composite name, why) for composite "auto": the transformer composite where the graph has
    attention, which shows as a product of two activations; the CNN composite otherwise."""
    for node in graph.nodes:
        operands = ACTIVATION_PRODUCTS.get(node.op)
        if operands and len(node.inputs) > max(operands) and not any(is_constant(node.inputs[k]) for k in operands):
            return TRANSFORMER_COMPOSITE, f"auto: attention, {node.op} {node.name!r} multiplies two activations"
    return CNN_COMPOSITE, "auto: no attention, no product of two activations"


def choose_composite(composite, method, rules, params):
    """The composite of ``method``: LRP's, its rules filled from ``params`` and ``rules`` (overrides),
    or the chain rule everywhere for the baselines, which take neither."""
    if method not in METHODS:
        raise RuleError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "lrp":
        return make_composite(composite or DEFAULT_COMPOSITE, params, rules)
    if rules or params.given():
        raise RuleError(f"method {method!r} has no rules; composite parameters and rules apply to method lrp")
    return gradient_composite()


def plan(
    model: ModelSource,
    composite: str = DEFAULT_COMPOSITE,
    *,
    input_name: Optional[str] = None,
    rules: Optional[Overrides] = None,
    method: str = "lrp",
    input_shapes: Optional[Mapping[str, Sequence[Union[int, str]]]] = None,
    **rule_params: Any,
) -> Plan:
    """Load the model and decide every unit's rule, listing every node that cannot be explained and
    every rule that does not fit its node. ``rule_params`` are a ``RuleParams``' fields (alpha,
    beta, epsilon, gamma, low, high, stabilizer, zero_params); ``method`` other than "lrp" replaces
    the composite by the chain rule everywhere; ``input_shapes`` ({input name: dims}) pins sizes
    the model leaves dynamic (load.pin_input_shapes)."""
    params = RuleParams.of(rule_params)
    auto = method == "lrp" and composite_name(composite or DEFAULT_COMPOSITE) == AUTO
    if not auto:  # a bad composite fails first, before the model is read
        chosen: Composite = choose_composite(composite, method, rules, params)
    held = HeldWeights()
    proto, label = load_model(model, held, input_shapes)
    graph = import_graph(proto, held)
    chosen_by = ""
    if auto:
        name, chosen_by = auto_composite(graph)
        chosen = choose_composite(name, method, rules, params)
    for name in ADDED_NAMES:
        if name in graph.tensors():
            raise UnsupportedModelError(f"{label}: the model already has a tensor named {name!r}")
    explained_input, explained, at_embedding = pick_input(graph, label, input_name)
    score, predicted = find_logits(graph, label)
    logits = mirrored(graph, predicted)  # a quantized or float16 model's relevance pass may read a mirror
    all_units = find_units(graph, explained, graph.outputs)
    units, reached = _upstream_of(all_units, logits)
    nonnegative = nonnegative_tensors(graph)
    rules_by_unit: dict[str, Rule] = {}
    problems: list[tuple[str, str, str]] = []
    rule_problems: list[tuple[str, str, str]] = []
    first_seen = False
    for unit in units:
        prop = lookup(unit)
        reason = "no propagator for this op" if prop is None else prop.problem(unit)
        if reason:
            problems.append((unit.name, unit.op, reason))
            continue
        unit.x_nonnegative = unit.inputs[0].name in nonnegative
        role = unit.role = prop.role_of(unit)
        if not prop.takes_rule(unit):
            continue
        is_first = role in ("conv", "dense") and not first_seen
        first_seen = first_seen or is_first
        rule = rules_by_unit[unit.name] = chosen.rule_for(unit, role, is_first)
        misfit = rule.problem(prop.traits_of(unit))
        if misfit:
            (rule_problems if rule.chosen else problems).append((unit.name, unit.op, misfit))
    _check_overrides(chosen, units)
    breaks = path_breaks(graph, explained, logits, all_units, reached)
    output_types = {o.name: o.type for o in proto.graph.output}
    return Plan(
        graph,
        label,
        explained_input,
        explained,
        at_embedding,
        score,
        logits,
        predicted,
        units,
        rules_by_unit,
        problems,
        rule_problems,
        breaks,
        chosen,
        method,
        output_types,
        upcast_types(proto),
        source_digest(model),
        held,
        chosen_by,
    )


def _check_overrides(composite, units):
    for pattern, _ in composite.overrides:
        if not any(pattern == u.op or fnmatch.fnmatchcase(u.name, pattern) for u in units):
            raise RuleError(f"rule override {pattern!r} matches no explained node name or op type")

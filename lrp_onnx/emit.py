"""Emit the explainer of a plan: seed = logit ⊙ onehot(target), one reverse walk over the units,
then the explainer's inputs, outputs and metadata, checked against the ONNX checker.

file → canonical graph (load.py) → units and a rule per unit (plan.py) → explainer graph
     (propagators in ops/, nodes by builder.py) → checked ModelProto
"""

import json
from collections import defaultdict
from importlib.metadata import version
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .builder import Builder
from .composites import DEFAULT_COMPOSITE
from .errors import InputError, LrpOnnxError, RuleError, UnsupportedModelError, first_line
from .external import without_large_weights
from .load import ModelSource
from .plan import EXPLAINED_CLASS, EXPLAINED_LOGIT, RELEVANCE, RELEVANCE_SEED, TARGET, plan
from .precision import restore_half_boundary
from .quantized import MIRROR
from .registry import lookup

LAYER_PREFIX = "relevance:"  # relevance:NAME, the relevance at tensor NAME (convert(layers=...))
LAYER_SUMS = ("channel",)
META_PREFIX = "lrp_onnx."


def convert(model: ModelSource, composite: str = DEFAULT_COMPOSITE, **options: Any) -> onnx.ModelProto:
    """The explainer of ``model`` (a path, bytes or ModelProto) as a checked ModelProto.

    Inputs: the original inputs plus ``target`` (int64 [N], -1 = predicted class); with
    ``seed_input=True`` a float ``relevance_seed`` shaped like the scores replaces the one-hot seed.
    Outputs: the original outputs plus ``relevance`` (float32, the explained input's shape: for
    token ids [N, T], summed over the embedding they are explained at), and
    ``relevance:NAME`` for each tensor NAME in ``layers``, shaped like it or, with
    ``layer_sum="channel"``, summed to [N, channels]. A float16 or bfloat16 model is explained in
    float32 (precision.py): float16 inputs and outputs stay float16, bfloat16 ones become float32.

    ``method``: "lrp", or a baseline in the same output: "gradient" ∂f/∂x, "sensitivity"
    (∂f/∂x)², "gradient-x-input" x·∂f/∂x (f the target's logit; the seed is the one-hot).

    Keyword options: ``input_name``, ``rules``, ``seed_input``, ``layers``, ``layer_sum``,
    ``method``, ``input_shapes`` ({input name: dims}, pinning dynamic sizes) and the rule parameters.
    """
    proto, held = convert_held(model, composite, **options)
    return held.restored(proto)


def convert_held(
    model,
    composite=DEFAULT_COMPOSITE,
    *,
    input_name=None,
    rules=None,
    seed_input=False,
    layers=(),
    layer_sum=None,
    method="lrp",
    input_shapes=None,
    **rule_params,
):
    """``convert``, with the explainer's large weights left out of the proto: (proto, HeldWeights).
    Saving them from there (``runtime.save_model``) copies no weight into a protobuf message."""
    p = plan(
        model, composite, input_name=input_name, rules=rules, method=method, input_shapes=input_shapes, **rule_params
    )
    p.raise_problems()
    graph = p.graph
    layers = _check_layers(p, layers, layer_sum)
    b = Builder(graph)
    with b.scope("seed"):
        seed, extra_inputs, seed_outputs, valid = _seed(b, p.logits, p.predicted, seed_input, gradient=method != "lrp")
    relevance, at_layers = reverse_walk(b, p, seed, {t.name for t in layers.values()})
    with b.scope("method"):
        if method == "sensitivity":
            relevance = b.mul(relevance, relevance)
        elif method == "gradient-x-input":
            relevance = b.mul(relevance, b.as_float(p.explained))
        if p.at_embedding:
            # token ids: one value per token, Σ over the embedding axis (the full [N, T, D] is the layer p.explained)
            relevance = b.op("ReduceSum", relevance, b.ints([-1]), keepdims=0)
    shape = p.explained_input.shape if p.at_embedding else p.explained.shape
    extra_outputs = {RELEVANCE: (relevance, np.float32, shape), **seed_outputs}
    with b.scope("layers"):
        for name, tensor in layers.items():
            r = at_layers[tensor.name] if tensor.name in at_layers else b.zeros_like(tensor)
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
        if valid is not None and (name == RELEVANCE or name.startswith(LAYER_PREFIX)):
            with b.scope("target"):
                tensor = invalid_as_nan(b, valid, tensor)
        out = gs.Variable(name, dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[tensor], outputs=[out]))
        graph.outputs.append(out)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    # Exported, a large constant would be copied into the proto. Held, it is a reference in the main
    # graph's initializers (not in a subgraph's, where graphsurgeon puts what a subgraph reads).
    main = {id(node) for node in graph.nodes}
    for tensor in graph.tensors().values():
        if (
            isinstance(tensor, gs.Constant)
            and p.held.takes(tensor.dtype, tensor.shape)
            and all(id(node) in main for node in tensor.outputs)
        ):
            tensor.values = LazyValues(p.held.hold_array(tensor.name, tensor.values))
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = max(out.ir_version, 8)
    for output in out.graph.output:  # graphsurgeon knows only tensor types: restore ZipMap's map type
        if output.name in p.output_types:
            output.type.CopyFrom(p.output_types[output.name])
    restore_half_boundary(out, p.upcast)
    for key, value in metadata(p).items():
        out.metadata_props.add(key=META_PREFIX + key, value=value)
    try:
        without_large_weights(lambda shell: onnx.checker.check_model(shell, full_check=True), out)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        # The model passed the same check, so its graph holds something the checker missed there
        # (a weight whose rank contradicts an attribute, say) that the explainer's ops expose.
        raise UnsupportedModelError(
            f"{p.label}: the explainer fails the ONNX checker ({first_line(e)}); "
            "the model is likely inconsistent: if ONNX Runtime runs it, please report this"
        ) from None
    return out, p.held


def metadata(p):
    """How the explainer was made, as strings: enough to make it again from the source model."""
    slots, overrides = p.composite.describe()
    return {
        "explained_input": p.explained_input.name,
        "explained_tensor": p.explained.name,
        "score_output": p.score.name,
        "method": p.method,
        "composite": p.composite.name,
        "rules": json.dumps(slots),
        "overrides": json.dumps(overrides),
        "parameters": json.dumps(p.composite.params.given()),
        "version": version("lrp-onnx"),
        "source_sha256": p.source_sha256 or "unknown",
    }


def is_explainer(proto: onnx.ModelProto) -> bool:
    return any(o.name == RELEVANCE for o in proto.graph.output) and any(i.name == TARGET for i in proto.graph.input)


def read_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """{key: value} of the metadata ``convert`` wrote (JSON values decoded)."""
    meta = {p.key[len(META_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    return {k: json.loads(v) if k in ("rules", "overrides", "parameters") else v for k, v in meta.items()}


def _seed(b, logits, predicted, seed_input, gradient=False):
    """R at the logits: logits ⊙ onehot(target), target -1 meaning the argmax of the model's own
    logits ``predicted`` (where ``logits`` are their float mirror, the rounding of a near tie would
    otherwise choose another class than the model's); or a given seed tensor.
    For the gradient methods, ∂f/∂logits: onehot(target) itself.

    Returns the seed, the new graph inputs, and the new outputs besides ``relevance``: the class
    explained per sample (target with -1 resolved) and its logit, Σ R's reference value.
    """
    batch = logits.shape[0] if logits.shape is not None else "N"
    if seed_input:
        seed = gs.Variable(RELEVANCE_SEED, dtype=np.float32, shape=logits.shape)
        return seed, [seed], {}, None
    target = gs.Variable(TARGET, dtype=np.int64, shape=[batch])
    scores = logits  # [N, classes]; Caffe2 models end in [N, classes, 1, 1]
    flat = lambda t: t if t.shape is not None and len(t.shape) == 2 else b.op("Flatten", t, axis=1)
    logits = flat(scores)
    # The model's own logits rank the classes. Where the relevance pass reads a float mirror, in
    # float64: ONNX Runtime's CPU provider has no float16 ArgMax and runs float16 nodes in float32
    # between Casts, so a Cast of a float16 result to float32 would cancel the rounding Cast before
    # it, and a tie in float16 would be ranked unrounded.
    ranked = logits if predicted is scores else b.op("Cast", flat(predicted), to=onnx.TensorProto.DOUBLE)
    count = logits.shape[1] if logits.shape is not None else None
    # a constant depth where the class count is static: TensorRT takes OneHot with a build-time depth only
    classes = b.ints([count]) if isinstance(count, int) else b.op("Gather", b.shape(logits), b.ints([1]))
    # A target is -1 (the predicted class) or a class index; any other is invalid (the contract):
    # explained_class -1, explained_logit and relevance NaN, rather than OneHot's all-zero row for
    # a target past the classes or its wrap-around for one below -1.
    valid = b.op("And", b.op("GreaterOrEqual", target, b.ints(-1)), b.op("Less", target, classes))
    chosen = b.op(
        "Where",
        b.op("Equal", target, b.ints(-1)),
        b.op("ArgMax", ranked, axis=1, keepdims=0),
        b.op("Where", valid, target, b.ints(0)),
    )
    onehot = b.op("OneHot", chosen, classes, b.const([0.0, 1.0]), axis=-1)
    chosen_logit = b.op("ReduceSum", b.mul(logits, onehot), b.ints([1]), keepdims=0)
    seed = onehot if gradient else b.mul(logits, onehot)
    if logits is not scores:
        seed = b.reshape_like(seed, scores, scores)
    return (
        seed,
        [target],
        {
            EXPLAINED_CLASS: (b.op("Where", valid, chosen, b.ints(-1)), np.int64, [batch]),
            EXPLAINED_LOGIT: (invalid_as_nan(b, valid, chosen_logit), np.float32, [batch]),
        },
        valid,
    )


def invalid_as_nan(b, valid, tensor):
    """``tensor`` [N, ...] with NaN in every sample whose target is invalid (``valid`` [N] false):
    compared as [N, everything else], so its rank need not be known."""
    rows = b.op("Flatten", tensor, axis=1)  # not Reshape [0, -1], which cannot infer -1 for an empty batch
    marked = b.op("Where", b.op("Unsqueeze", valid, b.ints([1])), rows, b.const(np.nan))
    return b.op("Reshape", marked, b.shape(tensor))


def _check_layers(p, names, layer_sum):
    """{name: tensor} of the requested layers, each a float tensor on the explained path that some
    unit hands relevance to (not one inside a merged Conv+BatchNorm unit, say); where the relevance
    pass reads a mirror of the forward (quantized.py, precision.py), the tensor is the mirror's."""
    if layer_sum not in (None,) + LAYER_SUMS:
        raise RuleError(f"layer_sum must be one of {LAYER_SUMS} or None; got {layer_sum!r}")
    reachable = {t.name: t for u in p.units for t in u.outputs}
    reachable[p.explained.name] = p.explained
    merged = {
        t.name: u.name for u in p.units if u.followers for node in [u.head] + u.followers[:-1] for t in node.outputs
    }
    layers = {}
    for name in names:
        name_read = name + MIRROR if name + MIRROR in reachable else name
        if name_read in merged:
            raise InputError(
                f"{p.label}: layer {name!r} is inside the merged unit {merged[name_read]!r} "
                "(a linear layer and its BatchNorm or bias); ask for the unit's output"
            )
        if name_read not in reachable:
            where = "no such tensor" if name not in p.graph.tensors() else "not on the explained path"
            raise InputError(f"{p.label}: layer {name!r}: {where}")
        tensor = reachable[name_read]
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
        relevance_out = [b.total(contributions.pop(t.name)) if t.name in contributions else None for t in unit.outputs]
        at_layers.update((t.name, r) for t, r in zip(unit.outputs, relevance_out) if t.name in layers and r is not None)
        if all(r is None for r in relevance_out):
            continue
        with b.scope(unit.name):
            try:
                relevance_in = lookup(unit).propagate(b, unit, relevance_out, p.rules.get(unit.name))
            except LrpOnnxError:
                raise
            except Exception as e:  # a propagator bug must still name the node it failed on
                raise UnsupportedModelError(f"node {unit.name!r} ({unit.op}): {type(e).__name__}: {e}") from e
        if len(relevance_in) != len(unit.inputs):  # zip would drop relevance silently
            raise UnsupportedModelError(
                f"node {unit.name!r} ({unit.op}): its propagator returned "
                f"{len(relevance_in)} relevance(s) for {len(unit.inputs)} input(s)"
            )
        for t, r, rel in zip(unit.inputs, relevance_in, unit.relevant):
            if r is not None and rel:
                contributions[t.name].append(r)
    found = contributions.get(p.explained.name)
    relevance = b.total(found) if found else b.zeros_like(p.explained)
    if p.explained.name in layers:
        at_layers[p.explained.name] = relevance
    return relevance, at_layers

"""Elementwise ops: activations (pass), sums of activations (norm), affine ops with a constant
(relevance moves 1:1), and gates x·g(x) (relevance to the gated branch)."""

from ..errors import RuleError
from ..graph import is_constant
from ..rules import Epsilon, Norm, Pass
from ..registry import propagator

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
               "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Mish", "LRN")

# Unary ops a gate g(x) may be built from, and binary ops that are unary once one side is constant.
GATE_STEPS = ("Sigmoid", "Tanh", "Erf", "Softplus", "HardSigmoid", "Relu", "Clip", "Identity",
              "Add", "Sub", "Mul", "Div")


def _unbroadcast(b, r, like, out):
    """Sum r (shaped like ``out``) over the axes that broadcasting expanded, back to ``like``'s shape."""
    if r is None or like.shape is None or out.shape is None or list(like.shape) == list(out.shape):
        return r
    padded = [1] * (len(out.shape) - len(like.shape)) + list(like.shape)
    axes = [i for i, (d, o) in enumerate(zip(padded, out.shape)) if d == 1 and o != 1]
    summed = b.op("ReduceSum", r, b.ints(axes), keepdims=1) if axes else r
    return b.reshape_like(summed, like)


def _passed(b, unit, r):
    """Relevance to every relevant input unchanged (one relevant input: an affine map or activation)."""
    return [_unbroadcast(b, r, t, unit.outputs[0]) if rel else None for t, rel in zip(unit.inputs, unit.relevant)]


@propagator(*ACTIVATIONS, role="activation")
def activation(b, unit, relevance_out, rule):
    """Activations get Zennit's Pass: R_in = R_out."""
    if not isinstance(rule, Pass):
        raise RuleError(f"node {unit.name!r} ({unit.op}): activations take the pass rule, not {rule.name!r}")
    return _passed(b, unit, relevance_out[0])


def _sum_role(unit):
    return "sum" if sum(unit.relevant) >= 2 else "route"


@propagator("Add", "Sub", "Sum", role=_sum_role)
def sum_of_activations(b, unit, relevance_out, rule):
    """Two or more activations: Norm, R_k = ±x_k · R / stabilize(z) (minus for Sub's second input).

    With one activation (plus a constant or non-explained tensor) relevance moves unchanged.
    """
    r = relevance_out[0]
    if sum(unit.relevant) < 2:
        return _passed(b, unit, r)
    if not isinstance(rule, (Norm, Epsilon)):
        raise RuleError(f"node {unit.name!r} ({unit.op}): a sum of activations takes norm or epsilon, "
                        f"not {rule.name!r}")
    epsilon = rule.stabilizer if isinstance(rule, Norm) else rule.epsilon
    s = b.div(r, b.stabilize(unit.outputs[0], epsilon))
    shares = []
    for k, (x, rel) in enumerate(zip(unit.inputs, unit.relevant)):
        share = b.mul(x, s) if rel else None
        if share is not None and unit.op == "Sub" and k == 1:
            share = b.neg(share)
        shares.append(_unbroadcast(b, share, x, unit.outputs[0]))
    return shares


def gated_input(unit):
    """For Mul(a, g) with g computed from a by elementwise steps only, the index of a; else None."""
    for k in (0, 1):
        a, g = unit.inputs[k], unit.inputs[1 - k]
        seen, frontier = 0, [g]
        while frontier and seen < 16:
            t = frontier.pop()
            seen += 1
            if t is a:
                return k
            if len(t.inputs) != 1 or t.inputs[0].op not in GATE_STEPS:
                continue
            step = t.inputs[0]
            variable = [i for i in step.inputs if not is_constant(i)]
            if len(variable) == 1:
                frontier.append(variable[0])
    return None


def _check_product(unit):
    if unit.op == "Mul" and sum(unit.relevant) >= 2 and gated_input(unit) is None:
        return "a product of two explained activations that is not a gate x·g(x)"
    if unit.op == "Div" and unit.relevant[1]:
        return "division by an explained activation"
    return None


def _product_receivers(unit):
    k = gated_input(unit) if sum(unit.relevant) >= 2 else None
    return list(unit.relevant) if k is None else [i == k for i in range(len(unit.inputs))]


@propagator("Mul", "Div", role="route", check=_check_product, receivers=_product_receivers)
def product(b, unit, relevance_out, rule):
    """x·c, x/c: relevance moves unchanged. A gate x·g(x) (SiLU, GELU, Mish): all of it to x."""
    r = relevance_out[0]
    if sum(unit.relevant) >= 2:
        k = gated_input(unit)
        return [_unbroadcast(b, r, unit.inputs[k], unit.outputs[0]) if i == k else None for i in range(2)]
    return _passed(b, unit, r)

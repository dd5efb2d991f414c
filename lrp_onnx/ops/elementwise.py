"""Elementwise ops: activations (pass), sums of activations (norm), affine ops with a constant
(relevance moves 1:1), and gates x·g(x) (relevance to the gated branch)."""

from ..errors import RuleError, UnsupportedModelError
from ..graph import is_constant
from ..rules import Epsilon, Gradient, Norm, Pass
from ..registry import propagator

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
               "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Mish", "LRN")

# How far back a gate's inputs are searched for the gated tensor: a squeeze-excitation branch is
# about ten nodes deep.
GATE_SEARCH_LIMIT = 64


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


# f'(x) of the activations the baseline methods differentiate, from the input x and output y.
# Clip's is 1 where it left x unchanged, min ≤ x ≤ max (as torch's clamp), and 0 elsewhere.
DERIVATIVES = {
    "Relu": lambda b, x, y, node: b.op("Cast", b.op("Greater", x, b.const(0.0)), to=1),
    "LeakyRelu": lambda b, x, y, node: b.op("Where", b.op("Greater", x, b.const(0.0)), b.const(1.0),
                                             b.const(node.attrs.get("alpha", 0.01))),
    "Clip": lambda b, x, y, node: b.op("Cast", b.op("Equal", x, y), to=1),
    "Sigmoid": lambda b, x, y, node: b.mul(y, b.sub(b.const(1.0), y)),
    "Tanh": lambda b, x, y, node: b.sub(b.const(1.0), b.mul(y, y)),
}


def _no_gradient(unit, what):
    return UnsupportedModelError(f"node {unit.name!r} ({unit.op}): the gradient of {what} is not implemented; "
                                 "explain with method lrp")


@propagator(*ACTIVATIONS, role="activation")
def activation(b, unit, relevance_out, rule):
    """Activations get Zennit's Pass: R_in = R_out. The gradient methods multiply by f'(x)."""
    r = relevance_out[0]
    if isinstance(rule, Gradient):
        if unit.op not in DERIVATIVES:
            raise _no_gradient(unit, unit.op)
        x, y = unit.inputs[0], unit.outputs[0]
        return [b.mul(r, DERIVATIVES[unit.op](b, x, y, unit.head))] + [None] * (len(unit.inputs) - 1)
    if not isinstance(rule, Pass):
        raise RuleError(f"node {unit.name!r} ({unit.op}): activations take the pass rule, not {rule.name!r}")
    return _passed(b, unit, r)


def _sum_role(unit):
    return "sum" if sum(unit.relevant) >= 2 and not _is_centering(unit) else "scale"


def _is_centering(unit):
    """x − mean(x), the first step of a decomposed LayerNorm: the identity rule treats the mean as
    a constant, so all relevance goes to x."""
    mean = unit.inputs[1].inputs[0] if unit.op == "Sub" and unit.inputs[1].inputs else None
    return mean is not None and mean.op == "ReduceMean" and mean.inputs[0] is unit.inputs[0]


def _sum_receivers(unit):
    return [True, False] if _is_centering(unit) else list(unit.relevant)


@propagator("Add", "Sub", "Sum", role=_sum_role, receivers=_sum_receivers)
def sum_of_activations(b, unit, relevance_out, rule):
    """Two or more activations: Norm, R_k = ±x_k · R / stabilize(z) (minus for Sub's second input).

    With one activation (plus a constant or non-explained tensor), or x − mean(x), relevance moves
    unchanged to the activation.
    """
    r = relevance_out[0]
    if isinstance(rule, Gradient):
        if _is_centering(unit):
            raise _no_gradient(unit, "x − mean(x)")
        return [_unbroadcast(b, b.neg(r) if unit.op == "Sub" and k == 1 else r, x, unit.outputs[0]) if rel else None
                for k, (x, rel) in enumerate(zip(unit.inputs, unit.relevant))]
    if _is_centering(unit):
        return [r, None]
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
    """For Mul(a, g) with g computed from a, the index of a; else None.

    g is a gate: SiLU's sigmoid(x), GELU's Φ(x), or a squeeze-excitation branch
    sigmoid(W₂·relu(W₁·mean(x))). The product passes relevance to a alone, the usual treatment of
    gates (as in AttnLRP): the gate scales the signal, it does not carry it.
    """
    for k in (0, 1):
        a, g = unit.inputs[k], unit.inputs[1 - k]
        seen, frontier = set(), [g]
        while frontier and len(seen) < GATE_SEARCH_LIMIT:
            t = frontier.pop()
            if t is a:
                return k
            if t.name in seen:
                continue
            seen.add(t.name)
            frontier.extend(i for node in t.inputs for i in node.inputs if not is_constant(i))
    return None


def _check_product(unit):
    if unit.op == "Mul" and sum(unit.relevant) >= 2 and gated_input(unit) is None:
        return "a product of two explained activations, neither computed from the other (not a gate x·g(x))"
    if unit.op == "Div" and unit.relevant[1] and gated_input(unit) != 0:
        return "division by an explained activation that is not computed from the numerator (not a norm x/σ(x))"
    return None


def _product_receivers(unit):
    k = gated_input(unit) if sum(unit.relevant) >= 2 else None
    return list(unit.relevant) if k is None else [i == k for i in range(len(unit.inputs))]


@propagator("Mul", "Div", role="scale", check=_check_product, receivers=_product_receivers)
def product(b, unit, relevance_out, rule):
    """x·c, x/c: relevance moves unchanged. A gate x·g(x) (SiLU, GELU, Mish, squeeze-excitation)
    and a normalisation x/σ(x) (a decomposed LayerNorm): all of it to x. The gradient of x·c is
    c·∂, of x/c ∂/c."""
    r = relevance_out[0]
    if isinstance(rule, Gradient):
        if sum(unit.relevant) >= 2:
            raise _no_gradient(unit, "a gate or normalisation")
        k = unit.relevant.index(True)
        other = unit.inputs[1 - k]
        g = b.mul(r, other) if unit.op == "Mul" else b.div(r, other)
        return [_unbroadcast(b, g, unit.inputs[k], unit.outputs[0]) if i == k else None for i in range(2)]
    if sum(unit.relevant) >= 2:
        k = gated_input(unit)
        return [_unbroadcast(b, r, unit.inputs[k], unit.outputs[0]) if i == k else None for i in range(2)]
    return _passed(b, unit, r)


def _check_layer_norm(unit):
    if any(unit.relevant[1:]):
        return "LayerNormalization's scale and bias must not depend on the explained input"
    return None


@propagator("LayerNormalization", role="layernorm", check=_check_layer_norm)
def layer_norm(b, unit, relevance_out, rule):
    """y = γ·n + β with n = (x − mean)/std over the normalised axes.

    The normalisation takes the identity rule (mean and std count as constants: R_n = R_x), the
    affine part the composite's linear rule for it (Norm) on the diagonal map n ↦ γ·n + β, whose
    only input share is γ·n = y − β: R_x = (y − β) · R / stabilize(y).
    """
    if isinstance(rule, Gradient):
        raise _no_gradient(unit, "LayerNormalization")
    if not isinstance(rule, (Norm, Epsilon)):
        raise RuleError(f"node {unit.name!r} (LayerNormalization) takes norm or epsilon, not {rule.name!r}")
    r, y = relevance_out[0], unit.outputs[0]
    bias = unit.inputs[2] if len(unit.inputs) > 2 and unit.inputs[2].name else None
    if bias is not None:
        epsilon = rule.stabilizer if isinstance(rule, Norm) else rule.epsilon
        r = b.mul(b.sub(y, bias), b.div(r, b.stabilize(y, epsilon)))
    return [r] + [None] * (len(unit.inputs) - 1)

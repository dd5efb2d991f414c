"""Elementwise ops and their maps: activations (pass), sums of activations (norm), shifts and
scalings by a fixed tensor (pass: relevance moves 1:1), gates x·g(x) (relevance to the gated
branch) and LayerNorm."""

import numpy as np

from ..errors import SHAPE_HINT
from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..quantized import origin
from ..registry import mapped
from .linear import first_input_only

ACTIVATIONS = (
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Mish",
    "LRN",
)

# How far back a gate's inputs are searched for the gated tensor: a squeeze-excitation branch is
# about ten nodes deep.
GATE_SEARCH_LIMIT = 64


# f'(x) of the activations the baseline methods differentiate, from the input x and output y.
# Clip's is 1 where it left x unchanged, min ≤ x ≤ max (as torch's clamp), and 0 elsewhere.
DERIVATIVES = {
    "Relu": lambda b, x, y, node: b.op("Cast", b.op("Greater", x, b.const(0.0)), to=1),
    "LeakyRelu": lambda b, x, y, node: b.op(
        "Where", b.op("Greater", x, b.const(0.0)), b.const(1.0), b.const(node.attrs.get("alpha", 0.01))
    ),
    "Clip": lambda b, x, y, node: b.op("Cast", b.op("Equal", x, y), to=1),
    "Sigmoid": lambda b, x, y, node: b.mul(y, b.sub(b.const(1.0), y)),
    "Tanh": lambda b, x, y, node: b.sub(b.const(1.0), b.mul(y, y)),
    "Gelu": lambda b, x, y, node: _gelu_derivative(b, x, node.attrs.get("approximate", "none")),
}

GELU_TANH_CUBIC = 0.044715


def _gelu_derivative(b, x, approximate):
    """GELU(x) = x·Φ(x): Φ(x) + x·φ(x). The tanh form 0.5·x·(1 + t), t = tanh(u),
    u = √(2/π)·(x + 0.044715·x³): 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)."""
    if approximate == "tanh":
        square = b.mul(x, x)
        u = b.mul(b.mul(x, b.add(b.const(1.0), b.mul(square, b.const(GELU_TANH_CUBIC)))), b.const(np.sqrt(2 / np.pi)))
        t = b.op("Tanh", u)
        du = b.mul(b.add(b.const(1.0), b.mul(square, b.const(3 * GELU_TANH_CUBIC))), b.const(np.sqrt(2 / np.pi)))
        slope = b.mul(b.mul(x, b.sub(b.const(1.0), b.mul(t, t))), du)
        return b.mul(b.add(b.add(b.const(1.0), t), slope), b.const(0.5))
    cdf = b.mul(b.add(b.const(1.0), b.op("Erf", b.mul(x, b.const(1 / np.sqrt(2))))), b.const(0.5))
    pdf = b.mul(b.op("Exp", b.mul(b.mul(x, x), b.const(-0.5))), b.const(1 / np.sqrt(2 * np.pi)))
    return b.add(cdf, b.mul(x, pdf))


class ActivationMap(LinearMap):
    """y = f(x) elementwise, linearised at x: Fᵀ(g) = f'(x)·g. LRP passes relevance through it
    (Zennit's Pass); the chain rule multiplies by f'(x)."""

    def transpose(self, b, g, weight):
        return b.mul(g, DERIVATIVES[self.unit.op](b, self.x, self.output, self.unit.head))


def _activation_traits(unit):
    return Traits(elementwise=True, differentiable=unit.op in DERIVATIVES, kind=f"an activation ({unit.op})")


@mapped(*ACTIVATIONS, role="activation", traits=_activation_traits)
def activation(b, unit):
    return first_input_only(unit, ActivationMap(unit))


class SumMap(LinearMap):
    """Input k of z = Σ ±x_k (Add, Sub, Sum), the other inputs held fixed: F(x_k) = ±x_k, and
    ``output`` is the whole z, so the ε-rule is the proportional split R_k = ±x_k·R / stabilize(z)
    (Zennit's Norm). The inputs that get no relevance (constants, an input-independent tensor)
    are the bias: z = ±x_k + b with one explained input."""

    def __init__(self, b, unit, k, receivers):
        super().__init__(unit, x=unit.inputs[k])
        self.sign = _sign(unit, k)
        fixed = [
            t if _sign(unit, i) > 0 else b.neg(t) for i, (t, gets) in enumerate(zip(unit.inputs, receivers)) if not gets
        ]
        self.bias = b.total(fixed) if fixed else None

    def emit_forward(self, b, x, weight, bias):
        z = x if self.sign > 0 else b.neg(x)
        return z if bias is None else b.add(z, bias)

    def transpose(self, b, g, weight):
        return b.unbroadcast(g if self.sign > 0 else b.neg(g), self.x, self.output)


def _sign(unit, k):
    return -1 if unit.op == "Sub" and k == 1 else 1


def _sum_role(unit):
    """A sum of activations (x − mean(x) of a decomposed LayerNorm among them); or a shift of one
    by a fixed tensor (a bias, a position embedding, a mask)."""
    return "sum" if sum(unit.relevant) >= 2 else "shift"


def _sum_traits(unit):
    """Two or more explained summands share R (norm), so relevance may not pass unchanged to each;
    one explained summand plus fixed ones is an elementwise shift."""
    one = sum(unit.relevant) == 1
    return Traits(
        affine=True,
        elementwise=one,
        differentiable=True,
        kind="a shift by a fixed tensor" if one else "a sum of activations",
    )


@mapped("Add", "Sub", "Sum", role=_sum_role, traits=_sum_traits)
def sum_of_activations(b, unit):
    """Each explained summand's map. Two or more take norm: R_k = ±x_k · R / stabilize(z). One
    activation plus a constant or non-explained tensor takes pass: R moves unchanged.

    x − mean(x), a decomposed LayerNorm's centring, is such a sum: the mean's share goes back to x
    through the ReduceMean, R_x = x ⊙ C(R/z), as the fused LayerNorm's rule (LayerNormMap)."""
    return [SumMap(b, unit, k, unit.relevant) if gets else None for k, gets in enumerate(unit.relevant)]


def gated_input(unit):
    """For Mul(a, g) with g computed from a, the index of a; else None.

    g is a gate: SiLU's sigmoid(x), GELU's Φ(x), or a squeeze-excitation branch
    sigmoid(W₂·relu(W₁·mean(x))). The product passes relevance to a alone, the usual treatment of
    gates (as in AttnLRP): the gate scales the signal, it does not carry it.
    """
    for k in (0, 1):
        # a quantized product's view reads stand-ins for its operands: search from what they stand for
        a, g = origin(unit.inputs[k]), origin(unit.inputs[1 - k])
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
    if unit.op == "Div" and unit.relevant[1] and gated_input(unit) != 0:
        return "division by an explained activation that is not computed from the numerator (not a norm x/σ(x))"
    return None


class ScaleMap(LinearMap):
    """Input k of x·c or x/c, c held fixed: the diagonal map F(x) = c·x (or x/c), whose transpose
    scales by c (1/c) and sums over broadcast axes. c is a constant, an input-independent tensor,
    or a gate g(x) computed from x itself (then the map is not x's Jacobian)."""

    def __init__(self, unit, k):
        super().__init__(unit, x=unit.inputs[k])
        self.factor = unit.inputs[1 - k]
        self.scale_op = unit.op

    def emit_forward(self, b, x, weight, bias):
        return b.op(self.scale_op, x, self.factor)

    def transpose(self, b, g, weight):
        return b.unbroadcast(b.op(self.scale_op, g, self.factor), self.x, self.output)


def _gated(unit):
    """The gated input of a gate x·g(x) or a normalisation x/σ(x); None for anything else."""
    return gated_input(unit) if sum(unit.relevant) >= 2 else None


def _factors(unit):
    """Mul of two explained activations, neither computed from the other (a gated MLP's a ⊙ b)."""
    return unit.op == "Mul" and sum(unit.relevant) >= 2 and _gated(unit) is None


def _product_receivers(unit):
    k = _gated(unit)
    return list(unit.relevant) if k is None else [i == k for i in range(len(unit.inputs))]


def _product_role(unit):
    return "product" if _factors(unit) else "scale"


def _product_traits(unit):
    """A product with a fixed factor is a diagonal linear map, and so is each factor of a ⊙ b with
    the other held fixed (they share R). A gate x·g(x) and a normalisation x/σ(x) are not linear
    in x: relevance passes to x, and their gradient is not implemented."""
    if _factors(unit):
        return Traits(affine=True, differentiable=True, kind="a product of explained activations")
    if sum(unit.relevant) >= 2:
        return Traits(elementwise=True, kind="a gate or normalisation")
    return Traits(affine=True, elementwise=True, differentiable=True, kind="a product with a fixed factor")


@mapped("Mul", "Div", role=_product_role, traits=_product_traits, check=_check_product, receivers=_product_receivers)
def product(b, unit):
    """x·c, x/c: relevance moves unchanged (pass). A gate x·g(x) (SiLU, GELU, Mish, squeeze-excitation)
    and a normalisation x/σ(x) (a decomposed LayerNorm): all of it to x. a ⊙ b: each factor's map,
    the other held fixed."""
    receivers = _product_receivers(unit)
    maps = [ScaleMap(unit, k) if gets else None for k, gets in enumerate(receivers)]
    for layer in maps:
        if layer is not None:
            layer.shares = sum(receivers)
    return maps


class Normalization:
    """Where a normalisation takes its statistics and where its scale and bias apply: over ``axes``
    of x in its grouped view (GroupNorm's [N, G, C/G·…]), and γ, β shaped to broadcast against x."""

    def __init__(self, unit):
        node, x = unit.head, unit.inputs[0]
        rank = len(x.shape)
        self.groups = node.attrs["num_groups"] if node.op == "GroupNormalization" else None
        if node.op == "LayerNormalization":
            self.axes = list(range(node.attrs.get("axis", -1) % rank, rank))
        else:  # statistics over the spatial axes per channel, or per group of channels in the grouped view
            self.axes = [2] if self.groups else list(range(2, rank))
        self.epsilon = node.attrs.get("epsilon", 1e-5)

    def reciprocal_count(self, b, x):
        """1 / the number of elements each statistic is over: a constant where x's sizes are static,
        else size(statistic)/size(x) at run time (dynamic image sizes)."""
        sizes = list(x.shape[1:]) if self.groups else [x.shape[a] for a in self.axes]
        if all(isinstance(d, int) for d in sizes):
            return b.const(float(self.groups or 1) / float(np.prod(sizes)))
        grouped = self.grouped(b, x)
        size = lambda u: b.op("Cast", b.op("Size", u), to=1)
        return b.div(size(b.op("ReduceSum", grouped, b.ints(self.axes), keepdims=1)), size(grouped))

    def grouped(self, b, t):
        return t if self.groups is None else b.op("Reshape", t, b.ints([0, self.groups, -1]))

    def ungrouped(self, b, t, like):
        return t if self.groups is None else b.reshape_like(t, like, like)

    def per_channel(self, b, unit, t):
        """γ or β as it broadcasts against x: LayerNorm's as it is, instance and group norm's
        ([C], opset 21's GroupNormalization) as [C, 1, …]."""
        if unit.op == "LayerNormalization":
            return t
        return b.const(np.asarray(t.values, np.float32).reshape([-1] + [1] * (len(unit.inputs[0].shape) - 2)))


def _check_normalization(unit):
    name = unit.op
    if any(unit.relevant[1:]):
        return f"{name}'s scale and bias must not depend on the explained input"
    shape = unit.inputs[0].shape
    if shape is None:
        return f"{name} needs the rank of its input"
    if name == "LayerNormalization":
        if not all(isinstance(shape[a], int) for a in Normalization(unit).axes):
            return f"LayerNormalization needs static sizes on the normalised axes; {SHAPE_HINT}"
        return None
    if not all(is_constant(t) for t in unit.inputs[1:] if t.name):
        return f"{name}'s scale and bias must be constants"
    if not isinstance(shape[1], int):
        return f"{name} needs a static channel count; {SHAPE_HINT}"
    return None


class NormalizationMap(LinearMap):
    """y = γ ⊙ C(x)/σ + β, with C(x) = x − mean(x) and σ = √(var(x) + eps) over the normalised axes
    (LayerNorm's last ones; instance norm's spatial ones; group norm's per group), linearised as
    LXT's AttnLRP does LayerNorm: σ is a constant, the mean is not. F(x) = γ ⊙ C(x)/σ is then
    linear with Fᵀ(g) = C(γ ⊙ g)/σ (C is self-adjoint, and so is the grouping reshape), and the
    ε-rule on it gives R_x = x ⊙ C(γ ⊙ R/st(y))/σ, with β absorbing its share."""

    def __init__(self, b, unit):
        super().__init__(unit)
        self.norm = Normalization(unit)
        self.scale = self.norm.per_channel(b, unit, unit.inputs[1])
        self.bias = (
            self.norm.per_channel(b, unit, unit.inputs[2]) if len(unit.inputs) > 2 and unit.inputs[2].name else None
        )
        self.reciprocal = self.norm.reciprocal_count(b, self.x)
        centred = self._centre(b, self.norm.grouped(b, self.x))
        variance = self._mean(b, b.mul(centred, centred))
        self.sigma = b.op("Sqrt", b.add(variance, b.const(self.norm.epsilon)))  # in the grouped view

    def _mean(self, b, t):
        """The mean over the normalised axes: ReduceSum (ReduceMean takes its axes as an input only
        from opset 18) times 1/count."""
        return b.mul(b.op("ReduceSum", t, b.ints(self.norm.axes), keepdims=1), self.reciprocal)

    def _centre(self, b, t):
        return b.sub(t, self._mean(b, t))

    def _normalised(self, b, t):
        """C(t)/σ, back in x's layout."""
        return self.norm.ungrouped(b, b.div(self._centre(b, self.norm.grouped(b, t)), self.sigma), self.x)

    def emit_forward(self, b, x, weight, bias):
        z = b.mul(self._normalised(b, x), self.scale)
        return z if bias is None else b.add(z, bias)

    def transpose(self, b, g, weight):
        return self._normalised(b, b.mul(g, self.scale))

    def gradient(self, b, g):
        """The true Jacobian's transpose, σ depending on x too: with h = γ ⊙ g and ŷ = C(x)/σ,
        ∂/∂x = (C(h) − ŷ ⊙ mean(h ⊙ ŷ)) / σ (in the grouped view)."""
        h = self.norm.grouped(b, b.mul(g, self.scale))
        normalised = b.div(self._centre(b, self.norm.grouped(b, self.x)), self.sigma)
        dx = b.div(b.sub(self._centre(b, h), b.mul(normalised, self._mean(b, b.mul(h, normalised)))), self.sigma)
        return self.norm.ungrouped(b, dx, self.x)


@mapped(
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    role="layernorm",
    traits=lambda unit: Traits(affine=True, differentiable=True, kind=unit.op),
    check=_check_normalization,
)
def normalization(b, unit):
    return first_input_only(unit, NormalizationMap(b, unit))


def _check_scale_only(unit):
    if any(unit.relevant[1:]):
        return f"{unit.op}'s scale must not depend on the explained input"
    return None


@mapped(
    "RMSNormalization",
    "LpNormalization",
    role="scale",
    traits=lambda unit: Traits(elementwise=True, kind=unit.op),
    check=_check_scale_only,
)
def scale_normalization(b, unit):
    """y = γ ⊙ x / √(mean(x²) + eps), or x / ‖x‖_p along an axis: the normaliser held constant,
    x ↦ x/n is a scaling, so R passes to x unchanged (LXT's identity rule for RMSNorm, which stops
    the gradient at the normaliser), as through the decomposed form's gate."""
    return first_input_only(unit, LinearMap(unit))


class SoftmaxMap(LinearMap):
    """s = softmax(x) over an axis, linearised at x: Fᵀ(g) = s ⊙ (g − Σ_axis s ⊙ g), the Jacobian's
    transpose. The ε-rule on it is AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1):
    R_x = x ⊙ (R − s ⊙ Σ_axis R), up to ε. A −inf in x (a mask) counts as 0: x ⊙ 0 would be NaN."""

    def __init__(self, b, unit):
        x = unit.inputs[0]
        super().__init__(unit, x=b.op("Where", b.op("IsInf", x, detect_positive=0), b.const(0.0), x))
        self.axis = unit.head.attrs.get("axis", -1)

    def transpose(self, b, g, weight):
        weighted = b.mul(self.output, g)
        return b.sub(weighted, b.mul(self.output, b.op("ReduceSum", weighted, b.ints([self.axis]), keepdims=1)))


@mapped("Softmax", role="softmax", traits=Traits(affine=True, differentiable=True, kind="a softmax"))
def softmax(b, unit):
    """A Softmax inside the network (attention weights); a final one is below the logits."""
    return first_input_only(unit, SoftmaxMap(b, unit))

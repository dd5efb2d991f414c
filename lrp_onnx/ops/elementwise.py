"""Elementwise ops and their maps: activations (pass), sums of activations (norm), shifts and
scalings by a fixed tensor (pass: relevance moves 1:1), gates x·g(x) (relevance to the gated
branch) and LayerNorm."""

import numpy as np

from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..registry import mapped
from .linear import first_input_only

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
               "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Mish", "LRN")

# How far back a gate's inputs are searched for the gated tensor: a squeeze-excitation branch is
# about ten nodes deep.
GATE_SEARCH_LIMIT = 64


# f'(x) of the activations the baseline methods differentiate, from the input x and output y.
# Clip's is 1 where it left x unchanged, min ≤ x ≤ max (as torch's clamp), and 0 elsewhere.
DERIVATIVES = {
    "Relu": lambda b, x, y, node: b.op("Cast", b.op("Greater", x, b.const(0.0)), to=1),
    "LeakyRelu": lambda b, x, y, node: b.op("Where", b.op("Greater", x, b.const(0.0)), b.const(1.0),
                                             b.const(node.attrs.get("alpha", 0.01))),
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
        fixed = [t if _sign(unit, i) > 0 else b.neg(t) for i, (t, gets) in enumerate(zip(unit.inputs, receivers))
                 if not gets]
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
    return Traits(affine=True, elementwise=one, differentiable=True,
                  kind="a shift by a fixed tensor" if one else "a sum of activations")


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


def _normalised_axes(unit):
    rank = len(unit.inputs[0].shape)
    return list(range(unit.head.attrs.get("axis", -1) % rank, rank))


def _check_layer_norm(unit):
    if any(unit.relevant[1:]):
        return "LayerNormalization's scale and bias must not depend on the explained input"
    shape = unit.inputs[0].shape
    if shape is None or not all(isinstance(shape[a], int) for a in _normalised_axes(unit)):
        return "LayerNormalization needs static sizes on the normalised axes"
    return None


class LayerNormMap(LinearMap):
    """y = γ ⊙ C(x)/σ + β, with C(x) = x − mean(x) and σ = √(var(x) + eps) over the normalised axes,
    linearised as LXT's AttnLRP does: σ is a constant, the mean is not. F(x) = γ ⊙ C(x)/σ is then
    linear with Fᵀ(g) = C(γ ⊙ g)/σ (C is self-adjoint), and the ε-rule on it gives
    R_x = x ⊙ C(γ ⊙ R/st(y))/σ, with β absorbing its share."""

    def __init__(self, b, unit):
        super().__init__(unit)
        self.axes = _normalised_axes(unit)
        self.count = float(np.prod([self.x.shape[a] for a in self.axes]))
        self.scale = unit.inputs[1]
        self.bias = unit.inputs[2] if len(unit.inputs) > 2 and unit.inputs[2].name else None
        centred = self._centre(b, self.x)
        variance = self._mean(b, b.mul(centred, centred))
        self.sigma = b.op("Sqrt", b.add(variance, b.const(unit.head.attrs.get("epsilon", 1e-5))))

    def _mean(self, b, t):
        return b.mul(b.op("ReduceSum", t, b.ints(self.axes), keepdims=1), b.const(1.0 / self.count))

    def _centre(self, b, t):
        return b.sub(t, self._mean(b, t))

    def emit_forward(self, b, x, weight, bias):
        z = b.div(b.mul(self._centre(b, x), self.scale), self.sigma)
        return z if bias is None else b.add(z, bias)

    def transpose(self, b, g, weight):
        return b.div(self._centre(b, b.mul(g, self.scale)), self.sigma)

    def gradient(self, b, g):
        """The true Jacobian's transpose, σ depending on x too: with h = γ ⊙ g and ŷ = C(x)/σ,
        ∂/∂x = (C(h) − ŷ ⊙ mean(h ⊙ ŷ)) / σ."""
        h = b.mul(g, self.scale)
        normalised = b.div(self._centre(b, self.x), self.sigma)
        return b.div(b.sub(self._centre(b, h), b.mul(normalised, self._mean(b, b.mul(h, normalised)))), self.sigma)


@mapped("LayerNormalization", role="layernorm",
        traits=Traits(affine=True, differentiable=True, kind="LayerNormalization"),
        check=_check_layer_norm)
def layer_norm(b, unit):
    return first_input_only(unit, LayerNormMap(b, unit))


def _check_rms_norm(unit):
    if any(unit.relevant[1:]):
        return "RMSNormalization's scale must not depend on the explained input"
    return None


@mapped("RMSNormalization", role="scale", traits=Traits(elementwise=True, kind="RMSNormalization"),
        check=_check_rms_norm)
def rms_norm(b, unit):
    """y = γ ⊙ x / √(mean(x²) + eps): LXT's identity rule (its RMSNorm stops the gradient at the
    normaliser), R passes to x unchanged, as through the decomposed form's gate."""
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

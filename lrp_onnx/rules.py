"""LRP rules as parameter objects, with Zennit's semantics (zennit 0.5, ``rules.py``).

Every rule that redistributes relevance through a linear map z = F(x; W, b) is one instance of
the *proportional split*: pick some terms (input', W', b'), let z' = Σ F(input'; W', b'), then

    R_x = Σ_terms input' ⊙ Fᵀ(R / stabilize(z'); W')

``LinearMap`` (``ops/linear.py``) supplies F and Fᵀ for Conv, ConvTranspose, Gemm, MatMul, the
pooling ops and per-channel affine maps. Each rule below only says which terms it uses; the
split itself is written once, in ``proportional``. Weight modifications (W⁺, W², ...) are emitted
as graph ops on the original initializer and constant-folded by the runtime at session load,
so the explainer file stores no weight copies.
"""

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from .errors import RuleError

Bound = Union[float, Sequence[float]]


@dataclass(frozen=True)
class Term:
    """One summand of z': F(input; weight, bias). ``bias=None`` means no bias."""
    input: object
    weight: object
    bias: object = None


def proportional(b, layer, terms, relevance, stabilizer, gate=None, sign=None):
    """R_x = Σ input ⊙ Fᵀ(s; W') with s = R / stabilize(Σ F(input; W', b')), optionally gated.

    ``sign``: +1 or -1 when every term of the denominator has that sign (see Builder.stabilize).
    """
    z = b.total(layer.forward(b, t.input, t.weight, t.bias) for t in terms)
    s = b.div(relevance, b.stabilize(z, stabilizer, sign))
    if gate is not None:
        s = b.mul(s, gate)
    return b.total(b.mul(t.input, layer.transpose(b, s, t.weight)) for t in terms)


def signed_parts(b, layer, x):
    """(x⁺, x⁻); x⁻ is None where x is known to be >= 0 (after a Relu, say): its terms vanish, and
    leaving them out saves two passes of the layer."""
    if layer.x_nonnegative:
        return x, None
    return b.positive(x), b.negative(x)


def present(*terms):
    """The terms whose input exists (see signed_parts)."""
    return [t for t in terms if t.input is not None]


def _check_stabilizer(value, name="stabilizer"):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise RuleError(f"{name} must be a finite number >= 0; got {value!r}")


@dataclass(frozen=True)
class Rule:
    """Base class. ``propagate(b, layer, x, r)`` returns the relevance at the layer's input x.

    ``zero_params=("bias",)`` is Zennit's option of the same name: the rule sees the layer without
    its bias, so the layer hands on all of its relevance (Σ R_in = Σ R_out up to the stabilizer).
    """
    zero_params: tuple = field(default=(), kw_only=True)
    name = "rule"
    needs_weights = True

    def __post_init__(self):
        names = (self.zero_params,) if isinstance(self.zero_params, str) else tuple(self.zero_params or ())
        if set(names) - {"bias"}:
            raise RuleError(f"zero_params may only name 'bias'; got {list(names)}")
        object.__setattr__(self, "zero_params", names)

    def params(self):
        return {k: v for k, v in self.__dict__.items() if k != "zero_params" or v}

    def describe(self):
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name


@dataclass(frozen=True)
class _Stabilized(Rule):
    """A rule whose only parameter is the denominator stabilizer."""
    stabilizer: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        _check_stabilizer(self.stabilizer)


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε (Bach et al. 2015): R_i = x_i Σ_j w_ij R_j / (z_j + ε·sign(z_j))."""
    epsilon: float = 1e-6
    name = "epsilon"
    needs_weights = False

    def __post_init__(self):
        super().__post_init__()
        _check_stabilizer(self.epsilon, "epsilon")

    def propagate(self, b, layer, x, r):
        return proportional(b, layer, [Term(x, layer.weight, layer.bias)], r, self.epsilon)


@dataclass(frozen=True)
class Norm(_Stabilized):
    """Proportional split by input contribution, as Zennit's Norm: ε-rule with ε only a stabilizer."""
    name = "norm"
    needs_weights = False

    def propagate(self, b, layer, x, r):
        return proportional(b, layer, [Term(x, layer.weight, layer.bias)], r, self.stabilizer)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ (Bach et al. 2015), Zennit's four-term form.

    R = α·[x⁺ Fᵀ(s⁺; W⁺) + x⁻ Fᵀ(s⁺; W⁻)] − β·[x⁺ Fᵀ(s⁻; W⁻) + x⁻ Fᵀ(s⁻; W⁺)]
    with s⁺ = R / (F(x⁺; W⁺, b⁺) + F(x⁻; W⁻)) and s⁻ = R / (F(x⁺; W⁻, b⁻) + F(x⁻; W⁺)).
    """
    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    name = "alpha-beta"

    def __post_init__(self):
        super().__post_init__()
        if not (self.alpha >= 0 and self.beta >= 0 and math.isclose(self.alpha - self.beta, 1.0)):
            raise RuleError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; "
                            f"got alpha={self.alpha}, beta={self.beta}")
        _check_stabilizer(self.stabilizer)

    def propagate(self, b, layer, x, r):
        w, bias = layer.weight, layer.bias
        w_pos, w_neg = b.positive(w), b.negative(w)
        x_pos, x_neg = signed_parts(b, layer, x)
        positive = proportional(b, layer, present(Term(x_pos, w_pos, _part(b, bias, b.positive)), Term(x_neg, w_neg)),
                                r, self.stabilizer, sign=+1)
        if self.beta == 0:
            return positive if self.alpha == 1 else b.mul(positive, b.const(self.alpha))
        negative = proportional(b, layer, present(Term(x_pos, w_neg, _part(b, bias, b.negative)), Term(x_neg, w_pos)),
                                r, self.stabilizer, sign=-1)
        return b.sub(b.mul(positive, b.const(self.alpha)), b.mul(negative, b.const(self.beta)))


@dataclass(frozen=True)
class ZPlus(_Stabilized):
    """LRP-z⁺ (Montavon et al. 2017) as Zennit implements it: α=1, β=0, negative inputs allowed."""
    name = "zplus"

    def propagate(self, b, layer, x, r):
        return AlphaBeta(1.0, 0.0, self.stabilizer).propagate(b, layer, x, r)


@dataclass(frozen=True)
class Gamma(Rule):
    """Generalised LRP-γ (Montavon et al. 2019; Andéol et al. 2021), Zennit's form.

    Outputs with z > 0 split by F(x⁺; W+γW⁺, b+γb⁺) + F(x⁻; W+γW⁻); outputs with z < 0 split by
    F(x⁺; W+γW⁻, b+γb⁻) + F(x⁻; W+γW⁺). z is the layer's own output, bias included even under
    zero_params (as Zennit selects).
    """
    gamma: float = 0.25
    stabilizer: float = 1e-6
    name = "gamma"

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise RuleError(f"gamma must be a finite number >= 0; got {self.gamma!r}")
        _check_stabilizer(self.stabilizer)

    def propagate(self, b, layer, x, r):
        w, bias = layer.weight, layer.bias

        def boosted(t, part):  # t + γ·part(t)
            return None if t is None else b.add(t, b.mul(part(t), b.const(self.gamma)))

        w_up, w_down = boosted(w, b.positive), boosted(w, b.negative)
        z = layer.output
        zero = b.const(0.0)
        x_pos, x_neg = signed_parts(b, layer, x)
        up = proportional(b, layer, present(Term(x_pos, w_up, boosted(bias, b.positive)), Term(x_neg, w_down)), r,
                          self.stabilizer, gate=b.op("Cast", b.op("Greater", z, zero), to=1))
        down = proportional(b, layer, present(Term(x_pos, w_down, boosted(bias, b.negative)), Term(x_neg, w_up)), r,
                            self.stabilizer, gate=b.op("Cast", b.op("Less", z, zero), to=1))
        return b.add(up, down)


@dataclass(frozen=True)
class Flat(_Stabilized):
    """LRP-flat (Lapuschkin et al. 2019): unit inputs and unit weights, no bias."""
    name = "flat"

    def propagate(self, b, layer, x, r):
        return proportional(b, layer, [Term(b.fill_like(x, 1.0), b.fill_like(layer.weight, 1.0))], r,
                            self.stabilizer)


@dataclass(frozen=True)
class WSquare(_Stabilized):
    """LRP-w² (Montavon et al. 2017): unit inputs, squared weights and squared bias (as Zennit)."""
    name = "wsquare"

    def propagate(self, b, layer, x, r):
        square = (lambda t: None if t is None else b.mul(t, t))
        return proportional(b, layer, [Term(b.fill_like(x, 1.0), square(layer.weight), square(layer.bias))], r,
                            self.stabilizer)


@dataclass(frozen=True)
class ZBox(Rule):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by [low, high].

    z' = F(x; W) − F(l; W⁺) − F(h; W⁻) (the biases cancel: b − b⁺ − b⁻ = 0). ``low`` and ``high``
    are scalars or per-channel lists (channel = axis 1 of the layer input).
    """
    low: Bound = 0.0
    high: Bound = 1.0
    stabilizer: float = 1e-6
    name = "zbox"

    def __post_init__(self):
        super().__post_init__()
        low, high = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (self.low, self.high))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in low + high):
            raise RuleError(f"zbox bounds must be finite numbers; got low={self.low!r}, high={self.high!r}")
        if len(low) != len(high) and 1 not in (len(low), len(high)):
            raise RuleError(f"zbox low and high have different lengths ({len(low)} and {len(high)})")
        if any(lo > hi for lo, hi in zip(low * len(high) if len(low) == 1 else low,
                                          high * len(low) if len(high) == 1 else high)):
            raise RuleError(f"zbox needs low <= high; got low={self.low!r}, high={self.high!r}")
        _check_stabilizer(self.stabilizer)

    def _bound(self, b, value, x, layer):
        """The bound broadcast to x's shape; a list is per channel (axis 1)."""
        value = np.asarray(value, np.float32)
        if value.ndim == 1:
            value = value.reshape([len(value)] + [1] * max(layer.input_rank - 2, 0))
        return b.op("Expand", b.const(value), b.shape(x))

    def propagate(self, b, layer, x, r):
        w = layer.weight
        minus_low = b.neg(self._bound(b, self.low, x, layer))
        minus_high = b.neg(self._bound(b, self.high, x, layer))
        return proportional(b, layer, [Term(x, w), Term(minus_low, b.positive(w)), Term(minus_high, b.negative(w))],
                            r, self.stabilizer)


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged; only for shape-preserving elementwise layers."""
    name = "pass"
    needs_weights = False

    def propagate(self, b, layer, x, r):
        return r


@dataclass(frozen=True)
class Gradient(Rule):
    """Not LRP: the chain rule, ∂f/∂x = Fᵀ(∂f/∂z), for the baseline methods (``method=``).
    Elementwise propagators multiply by the derivative instead of passing relevance on."""
    name = "gradient"
    needs_weights = False

    def propagate(self, b, layer, x, r):
        return layer.transpose(b, r, layer.weight)


def _part(b, bias, part):
    return None if bias is None else part(bias)


RULES = {cls.name: cls for cls in (Epsilon, AlphaBeta, ZPlus, Gamma, Flat, WSquare, ZBox, Pass, Norm)}


def make_rule(name, **params):
    """Build a rule from its name and keyword parameters, e.g. ``make_rule("gamma", gamma=0.5)``."""
    key = name.replace("_", "-").lower()
    key = {"alphabeta": "alpha-beta", "z-plus": "zplus", "w-square": "wsquare", "z-box": "zbox"}.get(key, key)
    if key not in RULES:
        raise RuleError(f"unknown rule {name!r}; known rules: {', '.join(RULES)}")
    cls = RULES[key]
    fields = cls.__dataclass_fields__
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise RuleError(f"rule {key!r} takes {sorted(fields) or 'no parameters'}; unknown: {unknown}")
    return cls(**params)

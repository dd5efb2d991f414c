"""LRP rules as parameter objects, with Zennit's semantics (zennit 0.5, ``rules.py``).

Every rule that redistributes relevance through a linear map z = F(x; W, b) is one instance of
the *proportional split*: pick one or more shares, each some terms (input', W', b') with a weight
c (αβ's α and −β), let z' = Σ F(input'; W', b') over a share's terms, then

    R_x = Σ_shares c · Σ_terms input' ⊙ Fᵀ(R / stabilize(z'); W')

A ``LinearMap`` (maps.py; the ops in ``ops/`` implement it) supplies F and Fᵀ for Conv,
ConvTranspose, Gemm, MatMul, the pooling ops, sums, products and shifts by a fixed tensor,
LayerNorm's affine part and per-channel affine maps. Each rule below only says which terms it
uses and which ``Traits`` it needs of the map; the split itself is written once, in
``proportional``. Weight modifications (W⁺, W², ...) are emitted
as graph ops on the original initializer and constant-folded by the runtime at session load,
so the explainer file stores no weight copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import RuleError

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from .builder import Builder
    from .maps import LinearMap, Traits

Bound = Union[float, Sequence[float]]


@dataclass(frozen=True)
class Term:
    """One summand of z': F(input; weight, bias). ``bias=None`` means no bias."""

    input: object
    weight: object
    bias: object = None


@dataclass(frozen=True)
class Share:
    """One denominator of the split: its terms make z', and R·weight / stabilize(z') goes back
    through them. ``sign``: +1 or -1 when every term is of that sign, so that z' ± ε is its
    stabilized form (for -1 that differs from sign(0) = +1 only where every term is 0, and there
    the relevance it divides is 0 anyway). ``gate``: a 0/1 tensor the share applies to (γ's z > 0)."""

    terms: Sequence[Term]
    weight: float = 1.0
    sign: Optional[int] = None
    gate: object = None


def proportional(b, layer, shares, relevance, stabilizer):
    """R_x = Σ_shares weight · Σ_terms input ⊙ Fᵀ(s; W') with s = R / stabilize(Σ F(input; W', b')).

    Fᵀ is linear in s, so the terms are gathered by input: each input is multiplied once, by
    Fᵀ summed over its terms. Shares of known sign over the same inputs run stacked where the map
    can (``_stacked``).
    """
    if (
        len(shares) > 1
        and layer.stackable
        and all(sh.sign is not None and sh.gate is None for sh in shares)
        and len({tuple(t.input.name for t in sh.terms) for sh in shares}) == 1
    ):
        return _stacked(b, layer, shares, relevance, stabilizer)
    by_input = {}  # input name -> (input, [Fᵀ(weight · s; W')])
    for share in shares:
        s = b.div(relevance, _stabilized_sum(b, layer, share, stabilizer))
        if share.gate is not None:
            s = b.mul(s, share.gate)
        for t in share.terms:
            transposed = layer.transpose(b, _scaled(b, s, share.weight), t.weight)
            by_input.setdefault(t.input.name, (t.input, []))[1].append(transposed)
    return b.total(b.mul(x, b.total(parts)) for x, parts in by_input.values())


def _stacked(b, layer, shares, relevance, stabilizer):
    """The K shares as one layer K times wider: W'_k stacked along the output channels, each
    share's bias with its ±ε likewise, so one pass gives every z'_k and one division every
    s_k = R / z'_k (R broadcast over the blocks). One transposed pass over the stacked s, with
    weight_k folded into block k of W', gives Σ_k weight_k·Fᵀ(s_k; W'_k). The split form runs K
    narrow passes each way, plus the elementwise work that combines them (benchmarks/LEVERS.md)."""
    inputs = [t.input for t in shares[0].terms]
    biases = [layer.shifted_bias(b, _bias(b, sh), sh.sign * stabilizer) for sh in shares]
    z = b.total(
        layer.forward_stacked(b, x, [sh.terms[i].weight for sh in shares], biases if i == 0 else None)
        for i, x in enumerate(inputs)
    )
    s = layer.divide_stacked(b, relevance, z, len(shares))
    factors = [sh.weight for sh in shares]
    return b.total(
        b.mul(x, layer.transpose_stacked(b, s, [sh.terms[i].weight for sh in shares], factors))
        for i, x in enumerate(inputs)
    )


def _bias(b, share):
    """Σ b' over the share's terms, None where none has one."""
    biases = [t.bias for t in share.terms if t.bias is not None]
    return b.total(biases) if biases else None


def _scaled(b, t, c):
    """c·t, with no op for c = 1 and a Neg for c = −1."""
    if c == 1:
        return t
    return b.neg(t) if c == -1 else b.mul(t, b.const(float(c)))


def _stabilized_sum(b, layer, share, stabilizer):
    """stabilize(Σ F(input; W', b')). A share of known sign adds its ±ε to the first term's bias,
    which the runtime folds at load: one elementwise pass less than adding it to z'."""
    terms = list(share.terms)
    if share.sign is None:
        return b.stabilize(b.total(layer.forward(b, t.input, t.weight, t.bias) for t in terms), stabilizer)
    if stabilizer:
        first = terms[0]
        terms[0] = Term(first.input, first.weight, layer.shifted_bias(b, first.bias, share.sign * stabilizer))
    return b.total(layer.forward(b, t.input, t.weight, t.bias) for t in terms)


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
    """A finite number >= 0: every stabilizer, ε and γ."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise RuleError(f"{name} must be a finite number >= 0; got {value!r}")


@dataclass(frozen=True)
class Rule:
    """Base class. ``apply(b, layer, r)`` returns the relevance at the layer's input x.

    ``requires`` names the ``Traits`` (maps.py) a layer must offer for the rule to apply: the plan
    checks it for every node before anything is emitted. ``zero_params=("bias",)`` is Zennit's
    option of the same name: the rule sees the layer without its bias, so the layer hands on all of
    its relevance (Σ R_in = Σ R_out up to the stabilizer).
    """

    zero_params: Union[str, Sequence[str]] = field(default=(), kw_only=True)  # a tuple once made
    name: ClassVar[str] = "rule"
    requires: ClassVar[tuple[str, ...]] = ("affine", "weighted")
    # A rule the user or their composite chose: a node it does not fit is their RuleError. (The
    # chain rule is the method's own: a node it cannot differentiate is unsupported.)
    chosen: ClassVar[bool] = True

    def __post_init__(self):
        names = (self.zero_params,) if isinstance(self.zero_params, str) else tuple(self.zero_params or ())
        if set(names) - {"bias"}:
            raise RuleError(f"zero_params may only name 'bias'; got {list(names)}")
        object.__setattr__(self, "zero_params", names)

    @classmethod
    def fits(cls, traits: Traits) -> bool:
        return all(getattr(traits, t) for t in cls.requires)

    def problem(self, traits: Traits) -> Optional[str]:
        """Why this rule cannot map relevance through a layer with ``traits``, or None."""
        if self.fits(traits):
            return None
        fitting = sorted({name for name, (cls, _) in NAMED_RULES.items() if cls.fits(traits)})
        return f"rule {self.name!r} does not fit {traits.kind}; it takes {', '.join(fitting) or 'no rule'}"

    def apply(self, b: Builder, layer: LinearMap, r: gs.Tensor) -> Optional[gs.Tensor]:
        if "bias" in self.zero_params:
            layer.drop_bias()
        return self.propagate(b, layer, layer.x, r)

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        """The relevance at ``x``, the layer's input, of the relevance ``r`` at its output: each rule's own."""
        raise NotImplementedError(f"rule {self.name!r} does not propagate relevance")

    def params(self) -> dict[str, Any]:
        """The parameters that are set, named as the flags and --rules files name them."""
        return {k: v for k, v in self._named().items() if k != "zero_params" or v}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name

    def as_dict(self) -> dict[str, Any]:
        """The rule and every parameter, as an override would name them (explainer metadata)."""
        return {"rule": self.name, **self._named()}

    def _named(self):
        """{parameter name: value}: a field that reads another parameter (norm's ε is the stabilizer)
        under that parameter's name."""
        names = {field: parameter for parameter, field in rule_parameters(self.name).items()}
        return {names.get(k, k): v for k, v in self.__dict__.items()}


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
    requires = ("affine",)

    def __post_init__(self):
        super().__post_init__()
        _check_stabilizer(self.epsilon, "epsilon")

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        # A factor of a product of n explained activations gets the ε-rule on R/n: AttnLRP's
        # uniform split (Achtibat et al. 2024), R_A = A ⊙ (R / (n·st(AB)))·Bᵀ for a MatMul.
        shares = self.shares(layer)
        r = r if shares == 1 else b.div(r, b.const(float(shares)))
        return proportional(b, layer, [Share([Term(x, layer.weight, layer.bias)])], r, self.epsilon)

    def shares(self, layer: LinearMap) -> int:
        return layer.shares


@dataclass(frozen=True)
class Norm(Epsilon):
    """Zennit's Norm: the ε-rule with ε only a stabilizer (the --stabilizer, not --epsilon), the
    proportional split by contribution that sums of activations and average pooling get."""

    name = "norm"


@dataclass(frozen=True)
class ConstantAttention(Epsilon):
    """CP-LRP (Ali et al. 2022), as LXT's: the ε-rule, with attention weights held constant. In
    O = A·V with A a Softmax's output, R_V = V ⊙ Aᵀ(R / st(O)) and A gets nothing, so nothing
    flows into the Softmax, Q or K. Other products split R uniformly, as ``Epsilon``."""

    name = "cp-epsilon"

    def apply(self, b: Builder, layer: LinearMap, r: gs.Tensor) -> Optional[gs.Tensor]:
        return None if layer.attention else super().apply(b, layer, r)

    def shares(self, layer: LinearMap) -> int:
        return 1 if layer.attention_partner else layer.shares


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
            raise RuleError(
                f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got alpha={self.alpha}, beta={self.beta}"
            )
        _check_stabilizer(self.stabilizer)

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        w, bias = layer.weight, layer.bias
        w_pos, w_neg = b.positive(w), b.negative(w)
        x_pos, x_neg = signed_parts(b, layer, x)
        positive = Share(
            present(Term(x_pos, w_pos, _part(b, bias, b.positive)), Term(x_neg, w_neg)), weight=self.alpha, sign=+1
        )
        negative = Share(
            present(Term(x_pos, w_neg, _part(b, bias, b.negative)), Term(x_neg, w_pos)), weight=-self.beta, sign=-1
        )
        return proportional(b, layer, [positive, negative] if self.beta else [positive], r, self.stabilizer)


@dataclass(frozen=True)
class ZPlus(_Stabilized):
    """LRP-z⁺ (Montavon et al. 2017) as Zennit implements it: α=1, β=0, negative inputs allowed."""

    name = "zplus"

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
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

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        w, bias = layer.weight, layer.bias

        def boosted(t, part):  # t + γ·part(t)
            return None if t is None else b.add(t, b.mul(part(t), b.const(self.gamma)))

        w_up, w_down = boosted(w, b.positive), boosted(w, b.negative)
        z = layer.output
        zero = b.const(0.0)
        x_pos, x_neg = signed_parts(b, layer, x)
        up = Share(
            present(Term(x_pos, w_up, boosted(bias, b.positive)), Term(x_neg, w_down)),
            gate=b.op("Cast", b.op("Greater", z, zero), to=1),
        )
        down = Share(
            present(Term(x_pos, w_down, boosted(bias, b.negative)), Term(x_neg, w_up)),
            gate=b.op("Cast", b.op("Less", z, zero), to=1),
        )
        return proportional(b, layer, [up, down], r, self.stabilizer)


@dataclass(frozen=True)
class Flat(_Stabilized):
    """LRP-flat (Lapuschkin et al. 2019): unit inputs and unit weights, no bias."""

    name = "flat"

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        return proportional(
            b, layer, [Share([Term(b.ones_per_sample(x), b.fill_like(layer.weight, 1.0))])], r, self.stabilizer
        )


@dataclass(frozen=True)
class WSquare(_Stabilized):
    """LRP-w² (Montavon et al. 2017): unit inputs, squared weights and squared bias (as Zennit)."""

    name = "wsquare"

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        square = lambda t: None if t is None else b.mul(t, t)
        return proportional(
            b,
            layer,
            [Share([Term(b.ones_per_sample(x), square(layer.weight), square(layer.bias))])],
            r,
            self.stabilizer,
        )


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
        if any(
            lo > hi
            for lo, hi in zip(low * len(high) if len(low) == 1 else low, high * len(low) if len(high) == 1 else high)
        ):
            raise RuleError(f"zbox needs low <= high; got low={self.low!r}, high={self.high!r}")
        _check_stabilizer(self.stabilizer)

    def _bound(self, b, value, x, layer):
        """The bound broadcast to x's shape; a list is per channel (axis 1)."""
        value = np.asarray(value, np.float32)
        if value.ndim == 1:
            value = value.reshape([len(value)] + [1] * max(layer.input_rank - 2, 0))
        return b.op("Expand", b.const(value), b.shape(x))

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        w = layer.weight
        minus_low = b.neg(self._bound(b, self.low, x, layer))
        minus_high = b.neg(self._bound(b, self.high, x, layer))
        terms = [Term(x, w), Term(minus_low, b.positive(w)), Term(minus_high, b.negative(w))]
        return proportional(b, layer, [Share(terms)], r, self.stabilizer)


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged (summed back over broadcast axes); for elementwise layers."""

    name = "pass"
    requires = ("elementwise",)

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        return layer.to_input(b, r)


@dataclass(frozen=True)
class Gradient(Rule):
    """Not LRP: the chain rule, ∂f/∂x = Fᵀ(∂f/∂z) with F the layer's own map (its Jacobian), for
    the baseline methods (``method=``). Every unit that takes a rule gets it."""

    name = "gradient"
    requires = ("differentiable",)
    chosen = False

    def problem(self, traits: Traits) -> Optional[str]:
        return (
            None if self.fits(traits) else f"the gradient of {traits.kind} is not implemented; explain with method lrp"
        )

    def propagate(self, b: Builder, layer: LinearMap, x: gs.Tensor, r: gs.Tensor) -> gs.Tensor:
        return layer.gradient(b, r)


def _part(b, bias, part):
    return None if bias is None else part(bias)


# Rule names (as --rules files and make_rule spell them) -> (class, {field: parameter name}) for
# the fields that read a parameter of another name; every other field reads its own name.
NAMED_RULES: dict[str, tuple[type[Rule], dict[str, str]]] = {
    "epsilon": (Epsilon, {}),
    "norm": (Norm, {"epsilon": "stabilizer"}),
    "cp-epsilon": (ConstantAttention, {}),
    "alpha-beta": (AlphaBeta, {}),
    "zplus": (ZPlus, {}),
    "gamma": (Gamma, {}),
    "flat": (Flat, {}),
    "wsquare": (WSquare, {}),
    "zbox": (ZBox, {}),
    "pass": (Pass, {}),
}
ALIASES = {"alphabeta": "alpha-beta", "z-plus": "zplus", "w-square": "wsquare", "z-box": "zbox"}


@dataclass(frozen=True)
class RuleParams:
    """The rule parameters of one conversion, parsed and checked once (CLI flags or
    ``convert(**params)``). None leaves a rule's own default. They fill every rule the conversion
    builds, the composite's and those named by overrides, unless the override sets its own."""

    alpha: Optional[float] = None
    beta: Optional[float] = None
    epsilon: Optional[float] = None
    gamma: Optional[float] = None
    low: Optional[Bound] = None
    high: Optional[Bound] = None
    stabilizer: Optional[float] = None
    zero_params: Union[str, Sequence[str]] = ()

    def __post_init__(self):
        # Each value is checked here under its own name (norm reads the stabilizer as its ε); the
        # constraints between values of one rule (alpha, beta >= 0 with alpha − beta = 1; low <= high)
        # are the rule's.
        for name in ("epsilon", "gamma", "stabilizer"):
            if getattr(self, name) is not None:
                _check_stabilizer(getattr(self, name), name)

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> RuleParams:
        """From keyword parameters; an unknown name is a RuleError naming the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise RuleError(f"unknown rule parameter(s) {unknown}; known: {', '.join(known)}")
        given = {k: v for k, v in params.items() if v is not None}
        if "zero_params" in given:
            given["zero_params"] = Rule(zero_params=given["zero_params"]).zero_params
        return cls(**given)

    def given(self) -> dict[str, Any]:
        """{name: value} of the parameters that were set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, ())}

    def without(self, *names: str) -> RuleParams:
        cleared: dict[str, Any] = {n: () if n == "zero_params" else None for n in names}
        return replace(self, **cleared)


def rule_key(name):
    key = str(name).replace("_", "-").lower()
    key = ALIASES.get(key, key)
    if key not in NAMED_RULES:
        raise RuleError(f"unknown rule {name!r}; known rules: {', '.join(NAMED_RULES)}")
    return key


def rule_parameters(name):
    """{parameter name: field name} of the rule called ``name``."""
    cls, sources = NAMED_RULES[rule_key(name)]
    return {sources.get(f.name, f.name): f.name for f in fields(cls)}


def make_rule(name: str, params: RuleParams = RuleParams(), **explicit: Any) -> Rule:
    """A rule by name, e.g. ``make_rule("gamma", gamma=0.5)``. ``params`` fills the parameters
    that are not given explicitly; the rule's defaults fill the rest."""
    key = rule_key(name)
    accepted = rule_parameters(key)
    unknown = sorted(set(explicit) - set(accepted))
    if unknown:
        raise RuleError(f"rule {key!r} takes {sorted(accepted)}; unknown: {unknown}")
    values = {**{p: v for p, v in params.given().items() if p in accepted}, **explicit}
    return NAMED_RULES[key][0](**{accepted[p]: v for p, v in values.items()})

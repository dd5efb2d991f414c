"""Composites: which rule each unit gets. Kept apart from the rule maths and from graph analysis.

Every composite carries Zennit's base layer map (``layer_map_base``): activations get Pass, sums
of activations and average pooling get Norm, an unmerged BatchNorm gets Pass. LayerNorm, which
Zennit has no rule for, gets Norm on its affine part (ops/elementwise.py). The composites of
Zennit's names assign the same rules as Zennit; "convolution" means Conv/ConvTranspose and
"dense" means Gemm/MatMul. Overrides (``--rules``) map node-name globs or op types to a rule
and win over the composite; a name match wins over an op-type match.
"""

import fnmatch
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from .errors import RuleError, first_line
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, ZBox, ZPlus, make_rule


@dataclass
class Composite:
    name: str
    conv: Rule
    dense: Rule
    first: Optional[Rule] = None  # rule of the first linear layer reached from the explained input
    stabilizer: float = 1e-6
    overrides: list = field(default_factory=list)  # [(pattern, rule)]

    def base(self, role):
        return {"activation": Pass(), "batchnorm": Pass(), "scale": Pass(), "sum": Norm(self.stabilizer),
                "avgpool": Norm(self.stabilizer), "layernorm": Norm(self.stabilizer)}.get(role)

    def rule_for(self, unit, role, is_first):
        """The rule of ``unit`` (None for units whose propagation is fixed)."""
        if role == "route":
            return None
        by_name = [rule for pattern, rule in self.overrides if fnmatch.fnmatchcase(unit.name, pattern)]
        by_op = [rule for pattern, rule in self.overrides if pattern == unit.op]
        if by_name or by_op:
            return (by_name or by_op)[0]
        if role in ("conv", "dense"):
            if is_first and self.first is not None:
                return self.first
            return self.conv if role == "conv" else self.dense
        return self.base(role)

    def with_overrides(self, overrides):
        """A copy with extra overrides: a dict, or a JSON/TOML file, of pattern -> rule spec."""
        if isinstance(overrides, (str, Path)):
            overrides = read_overrides(overrides)
        parsed = [(pattern, _rule_from_spec(pattern, spec)) for pattern, spec in (overrides or {}).items()]
        return Composite(self.name, self.conv, self.dense, self.first, self.stabilizer, self.overrides + parsed)


class GradientComposite(Composite):
    """Every unit gets the chain rule: the graph of the baseline methods (gradient, sensitivity,
    gradient × input), built by the same reverse walk as LRP."""

    def __init__(self):
        super().__init__("gradient", Gradient(), Gradient())

    def base(self, role):
        return Gradient()


def _rule_from_spec(pattern, spec):
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        return make_rule(spec)
    if isinstance(spec, dict) and "rule" in spec:
        params = {k: v for k, v in spec.items() if k != "rule"}
        return make_rule(spec["rule"], **params)
    raise RuleError(f"override {pattern!r}: expected a rule name or {{\"rule\": NAME, ...params}}, got {spec!r}")


def read_overrides(path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RuleError(f"cannot read rules file {str(path)!r}: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise RuleError(f"rules file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: "
                        f"{first_line(e)}") from None
    if not isinstance(data, dict):
        raise RuleError(f"rules file {str(path)!r} must map node-name globs or op types to rules")
    return data


def _alpha_beta(alpha=2.0, beta=1.0, stabilizer=1e-6):
    rule = AlphaBeta(alpha, beta, stabilizer)
    return Composite("alpha-beta", rule, rule, stabilizer=stabilizer)


def _epsilon(epsilon=1e-6, stabilizer=1e-6):
    rule = Epsilon(epsilon)
    return Composite("epsilon", rule, rule, stabilizer=stabilizer)


def _zplus(stabilizer=1e-6):
    rule = ZPlus(stabilizer)
    return Composite("zplus", rule, rule, stabilizer=stabilizer)


def _epsilon_alpha2_beta1(epsilon=1e-6, stabilizer=1e-6):
    return Composite("epsilon-alpha2-beta1", AlphaBeta(2.0, 1.0, stabilizer), Epsilon(epsilon), stabilizer=stabilizer)


def _epsilon_plus(epsilon=1e-6, stabilizer=1e-6):
    return Composite("epsilon-plus", ZPlus(stabilizer), Epsilon(epsilon), stabilizer=stabilizer)


def _epsilon_plus_flat(epsilon=1e-6, stabilizer=1e-6):
    return Composite("epsilon-plus-flat", ZPlus(stabilizer), Epsilon(epsilon), Flat(stabilizer), stabilizer)


def _epsilon_alpha2_beta1_flat(epsilon=1e-6, stabilizer=1e-6):
    return Composite("epsilon-alpha2-beta1-flat", AlphaBeta(2.0, 1.0, stabilizer), Epsilon(epsilon),
                     Flat(stabilizer), stabilizer)


def _epsilon_gamma_box(low=0.0, high=1.0, epsilon=1e-6, gamma=0.25, stabilizer=1e-6):
    return Composite("epsilon-gamma-box", Gamma(gamma, stabilizer), Epsilon(epsilon), ZBox(low, high, stabilizer),
                     stabilizer)


COMPOSITES = {
    "alpha-beta": _alpha_beta,
    "epsilon": _epsilon,
    "zplus": _zplus,
    "epsilon-alpha2-beta1": _epsilon_alpha2_beta1,
    "epsilon-plus": _epsilon_plus,
    "epsilon-plus-flat": _epsilon_plus_flat,
    "epsilon-alpha2-beta1-flat": _epsilon_alpha2_beta1_flat,
    "epsilon-gamma-box": _epsilon_gamma_box,
}


def make_composite(name="alpha-beta", zero_params=None, **params):
    """A composite by name (Zennit's names, ``-`` or ``_``), with its rule parameters.

    ``zero_params=["bias"]`` (as Zennit's composites) makes the composite's layer rules ignore
    biases; overrides keep their own setting."""
    if isinstance(name, Composite):
        if params or zero_params:
            raise RuleError("rule parameters go to make_composite(name, ...), not to a built Composite")
        return name
    key = str(name).replace("_", "-").lower()
    if key not in COMPOSITES:
        raise RuleError(f"unknown composite {name!r}; known composites: {', '.join(COMPOSITES)}")
    factory = COMPOSITES[key]
    accepted = factory.__code__.co_varnames[:factory.__code__.co_argcount]
    unknown = sorted(k for k, v in params.items() if v is not None and k not in accepted)
    if unknown:
        raise RuleError(f"composite {key!r} takes {', '.join(accepted)}; it does not use {', '.join(unknown)}")
    composite = factory(**{k: v for k, v in params.items() if v is not None})
    if zero_params:
        composite.conv, composite.dense, composite.first = (
            None if rule is None else replace(rule, zero_params=zero_params)
            for rule in (composite.conv, composite.dense, composite.first))
    return composite

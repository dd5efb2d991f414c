"""Composites: which rule each unit gets. Kept apart from the rule maths and from graph analysis.

A composite names a rule for each *slot*: "conv" (Conv, ConvTranspose), "dense" (Gemm, MatMul),
"first" (the first linear layer reached from the explained input), "norm" (sums of activations,
average pooling, LayerNorm), "product" (products of explained activations: attention's MatMuls,
a gated MLP's a ⊙ b), "softmax" (a Softmax inside the network) and "shift" (an activation plus
a fixed tensor). Every composite carries Zennit's base layer map
(``layer_map_base``): activations, products with a constant and an unmerged BatchNorm get pass,
and the "norm" slot is Zennit's Norm, the ε-rule with ε = the stabilizer (``--stabilizer``, not
``--epsilon``, as Zennit's ``layer_map_base(stabilizer)``). The composites of Zennit's names assign
the same rules as Zennit. Overrides (``--rules``) map node-name globs or op
types to a rule and win over the composite; a name match wins over an op-type match.

Rule parameters (``RuleParams``) fill every rule that takes them, the composite's and the
overrides', unless an override sets its own; ``zero_params`` reaches the layer rules and the
overrides, not the base map, as in Zennit.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from .errors import RuleError, first_line
from .rules import Gradient, Pass, Rule, RuleParams, make_rule, rule_key, rule_parameters

if TYPE_CHECKING:
    from .graph import Unit

# A slot's rule: its name, or (name, the parameters it fixes)
SlotSpec = Union[str, tuple[str, dict[str, Any]]]
# An override's rule: a Rule, its name, or {"rule": name, **parameters}
RuleSpec = Union[Rule, str, dict[str, Any]]
# Overrides: {node-name glob or op type: rule}, or a JSON or TOML file of them
Overrides = Union[Mapping[str, RuleSpec], str, Path]

# The default, "auto", is chosen per model (plan.auto_composite): AttnLRP where the graph has
# attention (it beats CP-LRP and the CNN composites on EVALUATION.md's ViT ground truth), else the
# seed paper's alpha-beta.
AUTO = "auto"
DEFAULT_COMPOSITE = AUTO
CNN_COMPOSITE, TRANSFORMER_COMPOSITE = "alpha-beta", "attnlrp"
# What the relevance output holds: LRP with a composite, or a baseline built by the same walk
# with the chain rule (plan.py).
METHODS = ("lrp", "gradient", "sensitivity", "gradient-x-input")
BASELINE_METHODS = METHODS[1:]

LAYER_SLOTS = ("conv", "dense", "first")
# role (registry.py) -> slot; roles not listed take pass
ROLE_SLOTS = {
    "conv": "conv",
    "dense": "dense",
    "sum": "norm",
    "avgpool": "norm",
    "layernorm": "norm",
    "product": "product",
    "softmax": "softmax",
    "shift": "shift",
}
# Slots every composite fills unless it says otherwise: Zennit's Norm, and on attention AttnLRP's
# rules with the composite's stabilizer as ε (products split R uniformly, the softmax is linearised)
BASE_SLOTS = {"norm": "norm", "product": "norm", "softmax": "norm"}

# name -> {slot: rule name, or (rule name, fixed parameters)}; "first" defaults to the layer's own
# slot and "norm" to Zennit's Norm.
COMPOSITES: dict[str, dict[str, SlotSpec]] = {
    "alpha-beta": {"conv": "alpha-beta", "dense": "alpha-beta"},
    "epsilon": {"conv": "epsilon", "dense": "epsilon"},
    "zplus": {"conv": "zplus", "dense": "zplus"},
    "epsilon-alpha2-beta1": {"conv": ("alpha-beta", {"alpha": 2.0, "beta": 1.0}), "dense": "epsilon"},
    "epsilon-plus": {"conv": "zplus", "dense": "epsilon"},
    "epsilon-plus-flat": {"conv": "zplus", "dense": "epsilon", "first": "flat"},
    "epsilon-alpha2-beta1-flat": {
        "conv": ("alpha-beta", {"alpha": 2.0, "beta": 1.0}),
        "dense": "epsilon",
        "first": "flat",
    },
    "epsilon-gamma-box": {"conv": "gamma", "dense": "epsilon", "first": "zbox"},
    # AttnLRP (Achtibat et al. 2024) and CP-LRP (Ali et al. 2022) as LXT 2.1: the ε-rule everywhere,
    # constants added to an activation (position embeddings, masks, biases) absorb their share
    "attnlrp": {
        "conv": "epsilon",
        "dense": "epsilon",
        "norm": "epsilon",
        "product": "epsilon",
        "softmax": "epsilon",
        "shift": "epsilon",
    },
    "cp-lrp": {
        "conv": "epsilon",
        "dense": "epsilon",
        "norm": "epsilon",
        "product": "cp-epsilon",
        "softmax": "epsilon",
        "shift": "epsilon",
    },
}
# Parameter defaults of a composite, where they differ from its rules' own: LXT divides by no ε at
# all, and ε = 1e-12 matches it in float32 (1e-6 is off by about 1e-3 relative L2).
COMPOSITE_DEFAULTS: dict[str, dict[str, Any]] = {"attnlrp": {"epsilon": 1e-12}, "cp-lrp": {"epsilon": 1e-12}}


@dataclass(frozen=True)
class Composite:
    name: str
    slots: dict[str, Rule]  # slot -> Rule
    overrides: tuple[tuple[str, Rule], ...] = ()  # ((pattern, Rule), ...)
    params: RuleParams = RuleParams()
    default: Rule = Pass()  # the rule of roles without a slot (activations, products, BatchNorm)

    def rule_for(self, unit: Unit, role: str, is_first: bool) -> Rule:
        """The rule of a unit that takes one (its role is not "route")."""
        by_name = [rule for pattern, rule in self.overrides if fnmatch.fnmatchcase(unit.name, pattern)]
        by_op = [rule for pattern, rule in self.overrides if pattern == unit.op]
        if by_name or by_op:
            return (by_name or by_op)[0]
        slot = "first" if is_first and "first" in self.slots else ROLE_SLOTS.get(role)
        return self.slots.get(slot, self.default) if slot is not None else self.default

    def describe(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """{slot: rule as a dict} and {pattern: rule as a dict}, for the explainer's metadata."""
        return (
            {slot: rule.as_dict() for slot, rule in self.slots.items()},
            {pattern: rule.as_dict() for pattern, rule in self.overrides},
        )


def gradient_composite() -> Composite:
    """Every unit gets the chain rule: the graph of the baseline methods (gradient, sensitivity,
    gradient × input), built by the same reverse walk as LRP."""
    return Composite("gradient", {}, default=Gradient())


def composite_name(name: str) -> str:
    """The COMPOSITES key that ``name`` means, written as here (``epsilon-plus-flat``), as Zennit
    registers it (``epsilon_plus_flat``) or as Zennit's class (``EpsilonPlusFlat``); case, ``-``
    and ``_`` do not matter."""

    def bare(text):
        return re.sub(r"[-_\s]", "", str(text)).lower()

    known = {bare(key): key for key in [AUTO, *COMPOSITES]}
    if bare(name) not in known:
        raise RuleError(
            f"unknown composite {name!r}; known composites: {AUTO}, {', '.join(COMPOSITES)} (Zennit's "
            "names and class names, such as epsilon_plus_flat or EpsilonPlusFlat, are accepted too)"
        )
    return known[bare(name)]


def make_composite(
    name: Union[str, Composite] = DEFAULT_COMPOSITE,
    params: RuleParams = RuleParams(),
    overrides: Optional[Overrides] = None,
) -> Composite:
    """A composite by name (``composite_name``), its rules filled from ``params``, and
    ``overrides`` (a dict or a JSON/TOML file of pattern -> rule spec). A parameter that no rule of
    the composite or its overrides takes is a RuleError."""
    if isinstance(name, Composite):
        return name
    key = composite_name(name)
    if key == AUTO:
        raise RuleError("composite 'auto' is chosen per model: plan() and convert() resolve it")
    specs = {**BASE_SLOTS, **COMPOSITES[key]}
    filled = RuleParams(**{**COMPOSITE_DEFAULTS.get(key, {}), **params.given()})
    slots: dict[str, Rule] = {}
    used: set[str] = set()
    fixed: dict[str, Any]
    for slot, spec in specs.items():
        rule_name, fixed = (spec, {}) if isinstance(spec, str) else spec
        slot_params = filled if slot in LAYER_SLOTS else filled.without("zero_params")
        slots[slot] = make_rule(rule_name, slot_params, **fixed)
        used.update(set(rule_parameters(rule_name)) - set(fixed))
    if isinstance(overrides, (str, Path)):
        overrides = read_overrides(overrides)
    parsed: list[tuple[str, Rule]] = []
    for pattern, override in (overrides or {}).items():
        rule, takes = _rule_from_spec(pattern, override, filled)
        parsed.append((pattern, rule))
        used.update(takes)
    unused = sorted(set(params.given()) - used)
    if unused:
        raise RuleError(
            f"composite {key!r} does not use {', '.join(unused)}: no rule it assigns takes "
            f"{'it' if len(unused) == 1 else 'them'}"
        )
    return Composite(key, slots, tuple(parsed), params)


def _rule_from_spec(pattern, spec, params):
    """(rule, the parameters it read from ``params``) for an override's spec."""
    if isinstance(spec, Rule):
        return spec, set()
    if isinstance(spec, dict) and "rule" in spec:
        name, explicit = spec["rule"], {k: v for k, v in spec.items() if k != "rule"}
    elif isinstance(spec, str):
        name, explicit = spec, {}
    else:
        raise RuleError(f'override {pattern!r}: expected a rule name or {{"rule": NAME, ...params}}, got {spec!r}')
    return make_rule(name, params, **explicit), set(rule_parameters(rule_key(name))) - set(explicit)


def read_overrides(path: Union[str, Path]) -> dict[str, Any]:
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
        raise RuleError(
            f"rules file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {first_line(e)}"
        ) from None
    if not isinstance(data, dict):
        raise RuleError(f"rules file {str(path)!r} must map node-name globs or op types to rules")
    return data

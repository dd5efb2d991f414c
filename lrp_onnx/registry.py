"""Registry of per-op propagators, keyed by (domain, op type).

Two kinds, as a JAX primitive is either linear (it has a transpose) or structural:

* ``@routing(ops)``: relevance is moved, never mixed, and takes no rule::

      @routing("Flatten", "Reshape")
      def rearranged(b, unit, relevance_out): ...   # -> one relevance per unit input, None for none

* ``@mapped(ops, role=..., traits=...)``: the op exposes one ``LinearMap`` (maps.py) per input,
  ``None`` where no relevance flows, and the unit's rule maps the relevance through it::

      @mapped("Conv", role="conv", traits=WEIGHTED)
      def linear_layer(b, unit): ...                # -> one LinearMap (or None) per unit input

``role`` tells composites which rule family a unit belongs to ("conv", "dense", "activation",
"sum", "avgpool", "batchnorm", "layernorm", "scale"); ``traits`` say what the map offers, so the
plan can check a rule against it before anything is emitted. Either may be a function of the unit.
``check(unit)`` may return a reason why this particular node cannot be explained, and
``receivers(unit)`` which inputs can get relevance (default: every one that depends on the
explained input), so that nodes feeding only a gate are never asked for a propagator.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Union

from .maps import Traits

ROUTE = "route"
DEFAULT_DOMAIN = ""
PROPAGATORS = {}  # (domain, op) -> Propagator, filled by importing lrp_onnx.ops


@dataclass(frozen=True)
class Propagator:
    fn: Callable
    role: Union[str, Callable] = ROUTE
    traits: Union[Traits, Callable, None] = None
    check: Optional[Callable] = None
    receivers: Optional[Callable] = None

    @property
    def takes_rule(self):
        return self.role != ROUTE

    def role_of(self, unit):
        return self.role(unit) if callable(self.role) else self.role

    def traits_of(self, unit):
        return self.traits(unit) if callable(self.traits) else self.traits

    def problem(self, unit):
        return self.check(unit) if self.check else None

    def receiving(self, unit):
        return self.receivers(unit) if self.receivers else list(unit.relevant)


def _register(ops, domain, propagator):
    for op in ops:
        key = (domain, op)
        if key in PROPAGATORS:
            raise RuntimeError(f"two propagators for {op} in domain {domain!r}")
        PROPAGATORS[key] = propagator


def routing(*ops, domain=DEFAULT_DOMAIN, check=None, receivers=None):
    def register(fn):
        _register(ops, domain, Propagator(fn, check=check, receivers=receivers))
        return fn
    return register


def mapped(*ops, role, traits, domain=DEFAULT_DOMAIN, check=None, receivers=None):
    def register(fn):
        _register(ops, domain, Propagator(fn, role, traits, check, receivers))
        return fn
    return register


def lookup(unit):
    """The propagator for ``unit``, or None if its (domain, op) has none. "ai.onnx" is the default domain."""
    domain = unit.head.domain or DEFAULT_DOMAIN
    return PROPAGATORS.get((DEFAULT_DOMAIN if domain == "ai.onnx" else domain, unit.op))

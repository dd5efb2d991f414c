"""Registry of per-op propagators.

A propagator maps the relevance at a unit's output to one relevance per head input, ``None``
where none flows (weights, shapes, indices)::

    @propagator("Flatten", "Reshape", role="route")
    def rearranged(b, unit, r, rule): ...

``role`` tells composites which rule family a unit belongs to: "conv" and "dense" (linear
layers), "activation", "sum", "avgpool", "batchnorm", "layernorm", "scale" (a product with a
constant or a gate), or "route" for units whose propagation is fixed (routing, max pooling),
which take no rule. ``role`` may be a function of the unit.
``check(unit)`` may return a reason why this particular node cannot be explained, and
``receivers(unit)`` which inputs can get relevance (default: every one that depends on the
explained input), so that nodes feeding only a gate are never asked for a propagator.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Union

PROPAGATORS = {}


@dataclass(frozen=True)
class Propagator:
    fn: Callable
    role: Union[str, Callable]
    check: Optional[Callable] = None
    receivers: Optional[Callable] = None

    def role_of(self, unit):
        return self.role(unit) if callable(self.role) else self.role

    def problem(self, unit):
        return self.check(unit) if self.check else None

    def receiving(self, unit):
        return self.receivers(unit) if self.receivers else list(unit.relevant)


def propagator(*ops, role, check=None, receivers=None):
    def register(fn):
        for op in ops:
            if op in PROPAGATORS:
                raise RuntimeError(f"two propagators for {op}")
            PROPAGATORS[op] = Propagator(fn, role, check, receivers)
        return fn
    return register


def lookup(unit):
    """The propagator for ``unit``, or None if its op has none."""
    from . import ops  # noqa: F401  (registers every propagator on first use)
    return PROPAGATORS.get(unit.op)

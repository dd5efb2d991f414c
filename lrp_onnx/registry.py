"""Registry of per-op propagators, keyed by (domain, op type).

Two kinds, as a JAX primitive is either linear (it has a transpose) or structural:

* ``@routing(ops)``: relevance is moved, never mixed, and takes no rule::

      @routing("Flatten", "Reshape")
      def rearranged(b, unit, relevance_out): ...   # -> one relevance per unit input, None for none

* ``@mapped(ops, role=..., traits=...)``: the op exposes one ``LinearMap`` (maps.py) per input,
  ``None`` where no relevance flows, and the unit's rule maps the relevance through it::

      @mapped("Conv", role="conv", traits=WEIGHTED)
      def linear_layer(b, unit): ...                # -> one LinearMap (or None) per unit input

* ``viewed(keys, view=...)``: the op stands for another op (a quantized or fused one for its
  float form): ``view(unit)`` gives a ``View``, a unit of that op over stand-in tensors, and the
  propagator of that op does the work, so each rule and map is written once::

      viewed(("", "QLinearConv"), view=float_view)

``role`` tells composites which rule family a unit belongs to ("conv", "dense", "activation",
"sum", "avgpool", "batchnorm", "layernorm", "scale"); ``traits`` say what the map offers, so the
plan can check a rule against it before anything is emitted. Either may be a function of the unit.
``check(unit)`` may return a reason why this particular node cannot be explained, and
``receivers(unit)`` which inputs can get relevance (default: every one that depends on the
explained input), so that nodes feeding only a gate are never asked for a propagator.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from .maps import Traits

ROUTE = "route"
DEFAULT_DOMAIN = ""
PROPAGATORS: dict[tuple[str, str], "Propagator"] = {}  # (domain, op) -> Propagator, filled by importing lrp_onnx.ops


@dataclass(frozen=True)
class Propagator:
    fn: Callable
    role: Union[str, Callable] = ROUTE
    traits: Union[Traits, Callable, None] = None
    check: Optional[Callable] = None
    receivers: Optional[Callable] = None

    def takes_rule(self, unit):
        return self.role != ROUTE

    def role_of(self, unit):
        return self.role(unit) if callable(self.role) else self.role

    def traits_of(self, unit):
        return self.traits(unit) if callable(self.traits) else self.traits

    def problem(self, unit):
        return self.check(unit) if self.check else None

    def receiving(self, unit):
        return self.receivers(unit) if self.receivers else list(unit.relevant)

    def propagate(self, b, unit, relevance_out, rule):
        """One relevance per unit input: a routing op moves R itself; an op that takes a rule hands
        it one map per input, and the rule maps R through each."""
        if not self.takes_rule(unit):
            return self.fn(b, unit, relevance_out)
        (r,) = relevance_out[:1]  # ops that take a rule have one output that carries relevance
        return [None if layer is None else rule.apply(b, layer, r) for layer in self.fn(b, unit)]


@dataclass
class View:
    """A unit as the op it stands for: ``unit``, a Unit of that op over stand-in tensors, where
    its input k stands for the viewed unit's input ``sources[k]`` (None: for none, a weight, say),
    and ``bind(b)`` emits the nodes that compute the stand-ins (once, when the explainer is built).
    A view's own nodes touch no graph tensor: graphsurgeon would count them among its readers or
    writers; the graph's tensors are read through the stand-ins ``bind`` computes."""

    unit: object
    sources: Sequence[Optional[int]]
    bind: Callable


@dataclass(frozen=True)
class ViewPropagator:
    """The propagator of an op read through ``view(unit)``: a View, or a string saying why this
    node has none. Role, traits, checks and relevance are those of the viewed op's propagator."""

    view: Callable

    def _view(self, unit):
        if unit.view is None:
            unit.view = self.view(unit)
        return unit.view

    def _inner(self, unit):
        view = self._view(unit)
        return view, lookup(view.unit)

    def takes_rule(self, unit):
        view, prop = self._inner(unit)
        return prop.takes_rule(view.unit)

    def role_of(self, unit):
        view, prop = self._inner(unit)
        return prop.role_of(view.unit)

    def traits_of(self, unit):
        view, prop = self._inner(unit)
        return prop.traits_of(view.unit)

    def problem(self, unit):
        view = self._view(unit)
        if isinstance(view, str):
            return view
        prop = lookup(view.unit)
        return f"no propagator for its form {view.unit.op}" if prop is None else prop.problem(view.unit)

    def receiving(self, unit):
        view, prop = self._inner(unit)
        return self._onto_unit(unit, view, prop.receiving(view.unit), False)

    def propagate(self, b, unit, relevance_out, rule):
        view, prop = self._inner(unit)
        view.bind(b)
        view.unit.x_nonnegative, view.unit.role = unit.x_nonnegative, unit.role
        return self._onto_unit(unit, view, prop.propagate(b, view.unit, relevance_out, rule), None)

    @staticmethod
    def _onto_unit(unit, view, per_view_input, empty):
        """Values given per input of the view's unit, placed at the inputs they stand for."""
        placed = [empty] * len(unit.inputs)
        for source, value in zip(view.sources, per_view_input):
            if source is not None:
                placed[source] = value
        return placed


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


def viewed(*keys, view):
    """Register (domain, op) ``keys`` as read through ``view`` (ViewPropagator)."""
    propagator = ViewPropagator(view)
    for domain, op in keys:
        _register([op], domain, propagator)


def lookup(unit):
    """The propagator for ``unit``, or None if its (domain, op) has none. "ai.onnx" is the default domain."""
    domain = unit.head.domain or DEFAULT_DOMAIN
    return PROPAGATORS.get((DEFAULT_DOMAIN if domain == "ai.onnx" else domain, unit.op))


def receiving(unit):
    """Which of ``unit``'s inputs its propagator gives relevance (every explained one where it has none)."""
    prop = lookup(unit)
    return prop.receiving(unit) if prop else unit.relevant

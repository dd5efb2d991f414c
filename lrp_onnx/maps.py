"""The contract between rules and ops: a ``LinearMap`` z = F(x; W) + b, and the traits it offers.

An op that takes a rule (registry.mapped) hands the rule one map per input. A map knows how to
emit F(x'; W', b') for modified inputs and weights, and the transpose Fᵀ(g; W') = ∂⟨F(x; W'), g⟩/∂x.
The rules in ``rules.py`` are written once against it; which rule fits which map is decided by the
map's ``Traits`` while planning, so ``inspect`` and ``convert`` agree on every node.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Traits:
    """What a map offers to rules.

    affine:         z = F(x) + b with F linear in x: the proportional split (ε) applies.
    weighted:       F has a weight that rules may modify (W⁺, W², ones): αβ, z⁺, γ, flat, w², z^B.
    elementwise:    each output element comes from one input element (up to broadcasting), so
                    relevance may pass unchanged (Pass).
    differentiable: ``gradient`` is the Jacobian's transpose, so the chain rule applies (the
                    gradient baselines).
    kind:           what the map is, for messages ("an activation", "a gate or normalisation").
    """

    affine: bool = False
    weighted: bool = False
    elementwise: bool = False
    differentiable: bool = False
    kind: str = "this op"


class LinearMap:
    """Base: ``x`` the input relevance goes to, ``output`` the forward output z, ``weight``/``bias``
    graph tensors (None where the map has none). ``forward`` reuses ``output`` for F(x; W, b)."""

    weight = None
    bias = None
    dropped_bias = None  # the bias zero_params took out of the rules; ``output`` still includes it
    # A factor of a product of explained activations (A·B, a ⊙ b) shares R with the other factors:
    # ``shares`` of them in all; ``attention`` says this factor is a Softmax's output (attention
    # weights) and ``attention_partner`` that another factor is.
    shares = 1
    attention = False
    attention_partner = False
    # Whether K weights can run as one map K times wider (``forward_stacked``, ``divide_stacked``,
    # ``transpose_stacked``): rules.proportional then stacks shares of known sign.
    stackable = False

    def __init__(self, unit, x=None, output=None):
        self.unit = unit
        self.x = unit.inputs[0] if x is None else x
        self.output = unit.outputs[0] if output is None else output
        self.input_rank = len(self.x.shape) if self.x.shape is not None else 2
        self.x_nonnegative = unit.x_nonnegative

    def forward(self, b, x, weight, bias=None):
        # The layer's own output already exists in the forward graph: reuse it.
        if x is self.x and weight is self.weight and bias is self.bias and self.dropped_bias is None:
            return self.output
        return self.emit_forward(b, x, weight, bias)

    def drop_bias(self):
        """Zennit's ``zero_params=["bias"]``: rules see F(x; W) alone. The forward output, which
        includes the bias, then no longer stands in for F(x; W)."""
        self.dropped_bias, self.bias = self.bias, None

    def to_input(self, b, r):
        """R moved unchanged onto x: summed over the axes broadcasting expanded x along."""
        return b.unbroadcast(r, self.x, self.output)

    def emit_forward(self, b, x, weight, bias):
        raise NotImplementedError

    def transpose(self, b, g, weight):
        raise NotImplementedError

    def shifted_bias(self, b, bias, shift):
        """The bias plus a constant ``shift`` (a stabilizer folded into the layer)."""
        return b.const(shift) if bias is None else b.add(bias, b.const(shift))

    def gradient(self, b, g):
        """∂⟨F(x), g⟩/∂x, the chain rule's step. For most maps the transpose itself; a map that
        linearises differently for LRP (LayerNorm, σ held constant) overrides it."""
        return self.transpose(b, g, self.weight)

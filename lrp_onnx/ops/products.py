"""MatMul: x·W with a constant W is a linear layer (linear.py); A·B of two explained activations
(attention scores Q·Kᵀ, context A·V) is a product whose factors share the relevance."""

from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..registry import mapped
from .linear import WEIGHTED, check_linear, first_input_only, linear_map

PRODUCT = Traits(affine=True, differentiable=True, kind="a product of explained activations")
# Between a Softmax and the product that reads its output (eval exports keep no Dropout, but a Cast may sit there)
TRANSPARENT = ("Dropout", "Cast", "Identity")


class MatMulFactorMap(LinearMap):
    """Factor k of Y = A·B, the other held fixed: F(A) = A·B with Fᵀ(Z) = Z·Bᵀ, or F(B) = A·B with
    Fᵀ(Z) = Aᵀ·Z (the last two axes transposed), summed over the batch axes it was broadcast along."""

    def __init__(self, unit, k):
        super().__init__(unit, x=unit.inputs[k])
        self.k, self.other = k, unit.inputs[1 - k]
        self.shares = sum(unit.relevant[:2])
        self.attention = _is_attention(self.x)
        self.attention_partner = self.shares == 2 and _is_attention(self.other)

    def emit_forward(self, b, x, weight, bias):
        return b.op("MatMul", *((x, self.other) if self.k == 0 else (self.other, x)))

    def transpose(self, b, g, weight):
        other_t = b.op("Transpose", self.other, perm=_swap_last(len(self.other.shape)))
        product = b.op("MatMul", g, other_t) if self.k == 0 else b.op("MatMul", other_t, g)
        # back to x's shape: sum the batch axes that broadcasting expanded x along
        rank = len(self.output.shape)
        padded = [1] * (rank - len(self.x.shape)) + list(self.x.shape)
        axes = [i for i in range(rank - 2) if padded[i] == 1 and self.output.shape[i] != 1]
        summed = b.op("ReduceSum", product, b.ints(axes), keepdims=1) if axes else product
        return summed if rank == len(self.x.shape) else b.reshape_like(summed, self.x)


def _swap_last(rank):
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _is_attention(t):
    while t.inputs and t.inputs[0].op in TRANSPARENT:
        t = t.inputs[0].inputs[0]
    return bool(t.inputs) and t.inputs[0].op == "Softmax"


def _is_bilinear(unit):
    return not is_constant(unit.inputs[1])


def _check_matmul(unit):
    if not _is_bilinear(unit):
        return check_linear(unit)
    if any(t.shape is None or len(t.shape) < 2 for t in list(unit.inputs) + [unit.outputs[0]]):
        return "a MatMul of two activations needs known ranks of at least 2"
    return None


@mapped("MatMul", role=lambda unit: "product" if _is_bilinear(unit) else "dense",
        traits=lambda unit: PRODUCT if _is_bilinear(unit) else WEIGHTED, check=_check_matmul)
def matmul(b, unit):
    """x·W: the linear layer. A·B: one map per explained factor."""
    if not _is_bilinear(unit):
        return first_input_only(unit, linear_map(b, unit))
    return [MatMulFactorMap(unit, k) if unit.relevant[k] else None for k in range(2)]

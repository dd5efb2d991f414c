"""MatMul: x·W with a constant W is a linear layer (linear.py); A·B of two explained activations
(attention scores Q·Kᵀ, context A·V) is a product whose factors share the relevance. Einsum of two
explained activations (MaxViT's attention) is the same product, written with indices."""

from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..registry import mapped
from .linear import WEIGHTED, check_linear, first_input_only, linear_map

PRODUCT = Traits(affine=True, differentiable=True, kind="a product of explained activations")
# Between a Softmax and the product that reads its output (eval exports keep no Dropout, but a Cast may sit there)
TRANSPARENT = ("Dropout", "Cast", "Identity")


class FactorMap(LinearMap):
    """Factor k of a product of two tensors, the other held fixed: linear in factor k. Both
    explained, they share R; either may be attention weights (a Softmax's output)."""

    def __init__(self, unit, k):
        super().__init__(unit, x=unit.inputs[k])
        self.k, self.other = k, unit.inputs[1 - k]
        self.shares = sum(unit.relevant[:2])
        self.attention = _is_attention(self.x)
        self.attention_partner = self.shares == 2 and _is_attention(self.other)


class MatMulFactorMap(FactorMap):
    """Factor k of Y = A·B, the other held fixed: F(A) = A·B with Fᵀ(Z) = Z·Bᵀ, or F(B) = A·B with
    Fᵀ(Z) = Aᵀ·Z (the last two axes transposed), summed over the batch axes it was broadcast along."""

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


@mapped(
    "MatMul",
    role=lambda unit: "product" if _is_bilinear(unit) else "dense",
    traits=lambda unit: PRODUCT if _is_bilinear(unit) else WEIGHTED,
    check=_check_matmul,
)
def matmul(b, unit):
    """x·W: the linear layer. A·B: one map per explained factor."""
    if not _is_bilinear(unit):
        return first_input_only(unit, linear_map(b, unit))
    return [MatMulFactorMap(unit, k) if unit.relevant[k] else None for k in range(2)]


class EinsumFactorMap(FactorMap):
    """Operand k of Y = einsum("a,b->y", A, B), the other held fixed: linear in it, with the
    transpose contracting Z with the other operand back onto k's indices, Fᵀ(Z) = einsum("y,b->a", Z, B)."""

    def __init__(self, unit, k):
        super().__init__(unit, k)
        terms, out = _einsum_terms(unit)
        self.equation = unit.head.attrs["equation"]
        self.transposed = f"{out},{terms[1 - k]}->{terms[k]}"

    def emit_forward(self, b, x, weight, bias):
        return b.op("Einsum", *((x, self.other) if self.k == 0 else (self.other, x)), equation=self.equation)

    def transpose(self, b, g, weight):
        return b.op("Einsum", g, self.other, equation=self.transposed)


def _einsum_terms(unit):
    """(input index strings, output index string) of an explicit two-operand equation, else None."""
    equation = unit.head.attrs.get("equation", "")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "->" not in equation:
        return None
    inputs, out = equation.split("->")
    return inputs.split(","), out


def _check_einsum(unit):
    parsed = _einsum_terms(unit)
    if parsed is None or len(parsed[0]) != 2 or len(unit.inputs) != 2:
        return "Einsum needs two operands and an explicit output (->)"
    (a, b), out = parsed
    if "." in a + b + out:
        return "Einsum with an ellipsis is not supported"
    if not all(unit.relevant):
        return "Einsum with a fixed operand is not supported, only products of two explained activations"
    for term, other in ((a, b), (b, a)):
        if len(set(term)) != len(term) or any(i not in out + other for i in term):
            return f"Einsum operand {term!r} repeats an index or sums one of its own (a trace or a diagonal)"
    return None


@mapped("Einsum", role="product", traits=PRODUCT, check=_check_einsum)
def einsum(b, unit):
    return [EinsumFactorMap(unit, k) for k in range(2)]

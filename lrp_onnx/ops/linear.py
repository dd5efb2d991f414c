"""The linear layers' maps z = F(x; W, b) with their transposes (maps.py): Conv, ConvTranspose,
Gemm, MatMul with any merged bias and BatchNorm, and an unmerged BatchNorm."""

import math

import numpy as np

from ..errors import SHAPE_HINT, UnsupportedModelError
from ..graph import batch_norm_affine, channel_count, is_constant, per_channel
from ..maps import LinearMap, Traits
from ..registry import mapped

WEIGHTED = Traits(affine=True, weighted=True, differentiable=True, kind="a linear layer")


def folded_affine(unit, scale=None, bias=None):
    """Compose the head's own bias with its followers: y ↦ s·y + t per output channel.

    Returns (scale, bias) as float64 vectors, or None where nothing applies. Folding BatchNorm:
    s = γ/√(σ²+ε), t = β − μ·s, exactly Zennit's MergeBatchNorm.
    """
    head = unit.head
    for node in unit.followers:
        if node.op == "BatchNormalization":
            s, t = batch_norm_affine(node)
        else:  # the constant operand (find_units has checked y ↦ y ± c, c·y, y / c)
            c = per_channel(next(t for t in node.inputs if is_constant(t)), head)
            # lazily: a zero bias is fine to add, not to divide by
            s, t = {
                "Add": lambda: (None, c),
                "Sub": lambda: (None, -c),
                "Mul": lambda: (c, None),
                "Div": lambda: (1.0 / c, None),
            }[node.op]()
        if s is not None:
            scale = s if scale is None else scale * s
            bias = None if bias is None else bias * s
        if t is not None:
            bias = t if bias is None else bias + t
    return scale, bias


class _WeightedMap(LinearMap):
    """A layer with an initializer weight; followers and Gemm's alpha/beta are folded in."""

    def __init__(self, b, unit, weight_layout_scale, base_scale=1.0, bias_factor=1.0):
        super().__init__(unit)
        head = unit.head
        weight = head.inputs[1]
        self.channels = channel_count(head)
        own_bias = head.inputs[2] if len(head.inputs) > 2 and head.inputs[2].name else None
        base_bias = None
        if own_bias is not None:
            base_bias = np.broadcast_to(
                np.asarray(own_bias.values, np.float64).reshape(-1) * bias_factor, (self.channels,)
            )
        scale, bias = folded_affine(unit, None if base_scale == 1.0 else np.full(self.channels, base_scale), base_bias)
        self.weight = weight if scale is None else b.mul(weight, b.const(weight_layout_scale(scale)))
        if bias is None:
            self.bias = None
        elif not unit.followers and bias_factor == 1.0 and own_bias.values.ndim == 1:
            self.bias = own_bias  # unchanged: use the original initializer, no copy
        else:
            self.bias = b.const(bias)

    def shifted_bias(self, b, bias, shift):
        # Conv and ConvTranspose take a bias of one value per output channel only
        return b.const(np.full(self.channels, shift)) if bias is None else b.add(bias, b.const(shift))


# Output elements per sample up to which a Conv's αβ shares run stacked. Above it (vgg16's 224 and
# 112 px layers) stacking gained at most 4 % per layer, while its twice-as-wide buffers raised
# vgg16's peak memory at batch 8 by 1.2 GB (benchmarks/LEVERS.md).
STACK_MAX_OUTPUT = 1 << 20


class ConvMap(_WeightedMap):
    """Conv: Fᵀ is a flipped Conv at stride 1, else ConvTranspose with the same weight, pads, strides
    and an output_padding that lands exactly on the input's size (a strided Conv drops trailing rows)."""

    def __init__(self, b, unit):
        head = unit.head
        w = head.inputs[1].values
        self.attrs = conv_attrs(unit)
        super().__init__(b, unit, lambda s: s.reshape([-1] + [1] * (w.ndim - 1)))
        # Stacking along the output channels would mix groups; the blocks' views need static sizes.
        shape = self.output.shape
        self.stackable = (
            self.attrs["group"] == 1
            and shape is not None
            and all(isinstance(d, int) for d in shape[1:])
            and math.prod(shape[1:]) <= STACK_MAX_OUTPUT
        )

    def emit_forward(self, b, x, weight, bias):
        return b.op("Conv", x, weight, bias, **self.attrs)

    def transpose(self, b, g, weight, channels=None):
        """``channels``: g's channel count where it is not the layer's (stacked parts)."""
        a = self.attrs
        spatial = len(a["strides"])
        reach = [(k - 1) * d for k, d in zip(a["kernel_shape"], a["dilations"])]
        pads = [reach[i % spatial] - p for i, p in enumerate(a["pads"])]
        if all(s == 1 for s in a["strides"]) and min(pads) >= 0:
            # Stride 1: the transpose is a Conv with the kernel flipped and its in/out channels swapped
            # (per group), padded by (k−1)·d − p. ORT runs Conv faster than ConvTranspose.
            flipped = self._flipped(b, weight, channels or self.channels)
            return b.op("Conv", g, flipped, **dict(a, pads=pads, kernel_shape=a["kernel_shape"]))
        return strided_transpose(b, g, weight, a, self.x)

    def forward_stacked(self, b, x, weights, biases=None):
        """F(x; [W_1; …; W_K], [b_1; …; b_K]): the K maps' outputs as blocks of channels."""
        bias = None if biases is None else b.op("Concat", *biases, axis=0)
        return b.op("Conv", x, b.op("Concat", *weights, axis=0), bias, **self.attrs)

    def divide_stacked(self, b, r, z, k):
        """r / z_k for each channel block k of z, as z is laid out: r viewed as [N, 1, C, HW] against
        z as [N, K, C, HW] (the sizes are static, so an empty batch reshapes too)."""
        c, spatial = self.channels, list(self.output.shape[2:])
        blocks = b.op("Reshape", z, b.ints([0, k, c, math.prod(spatial)]))
        s = b.div(b.op("Reshape", r, b.ints([0, 1, c, math.prod(spatial)])), blocks)
        return b.op("Reshape", s, b.ints([0, k * c] + spatial))

    def transpose_stacked(self, b, g, weights, factors):
        """Σ_k c_k·Fᵀ(g_k; W_k) for g stacked as ``forward_stacked`` lays it out: one transposed pass,
        over the forward's stacked weight times c_k per block (one weight fewer for the runtime to
        fold and hold at load than stacking the c_k·W_k)."""
        weight = b.op("Concat", *weights, axis=0)
        if any(c != 1 for c in factors):
            per_channel = np.repeat(np.asarray(factors, np.float32), self.channels)
            weight = b.mul(weight, b.const(per_channel.reshape([-1] + [1] * (len(self.attrs["strides"]) + 1))))
        return self.transpose(b, g, weight, channels=len(weights) * self.channels)

    def _flipped(self, b, weight, c_out):
        """W[o, i, k] -> W'[i, o, flip(k)], per group; constant-folded by the runtime at load (each
        step a weight-sized tensor while it folds: with one group, no reshapes)."""
        c_in_per_group = self.unit.head.inputs[1].values.shape[1]
        group, kernel = self.attrs["group"], self.attrs["kernel_shape"]
        spatial = list(range(3, 3 + len(kernel)))
        if group == 1:
            swapped = b.op("Transpose", weight, perm=[1, 0] + [a - 1 for a in spatial])
        else:
            grouped = b.op("Reshape", weight, b.ints([group, c_out // group, c_in_per_group] + kernel))
            swapped = b.op(
                "Reshape",
                b.op("Transpose", grouped, perm=[0, 2, 1] + spatial),
                b.ints([group * c_in_per_group, c_out // group] + kernel),
            )
        axes = list(range(2, 2 + len(kernel)))
        return b.op(
            "Slice",
            swapped,
            b.ints([-1] * len(kernel)),
            b.ints([np.iinfo(np.int64).min] * len(kernel)),
            b.ints(axes),
            b.ints([-1] * len(kernel)),
        )


class ConvTransposeMap(_WeightedMap):
    """ConvTranspose: Fᵀ is a Conv with the same weight, strides, pads and dilations."""

    def __init__(self, b, unit):
        head = unit.head
        w = head.inputs[1].values
        group = head.attrs.get("group", 1)
        spatial = w.ndim - 2
        self.attrs = {
            "strides": head.attrs.get("strides", [1] * spatial),
            "pads": head.attrs.get("pads", [0] * 2 * spatial),
            "dilations": head.attrs.get("dilations", [1] * spatial),
            "group": group,
        }
        self.forward_attrs = dict(self.attrs, output_padding=head.attrs.get("output_padding", [0] * spatial))

        def layout(s):  # weight [C_in, C_out/group, k...]; output channel o = group_index·C_out/group + j
            c_in, per_group = w.shape[0], w.shape[1]
            per_input = s.reshape(group, per_group)[np.arange(c_in) // (c_in // group)]
            return per_input.reshape([c_in, per_group] + [1] * spatial)

        super().__init__(b, unit, layout)

    def emit_forward(self, b, x, weight, bias):
        return b.op("ConvTranspose", x, weight, bias, **self.forward_attrs)

    def transpose(self, b, g, weight):
        return b.op("Conv", g, weight, **self.attrs)


class GemmMap(_WeightedMap):
    """Gemm y = α·op(x)·op(W) + β·C, with α folded into W and β into the bias.

    Fᵀ(g) = g·op(W)ᵀ, emitted as (op(W)·gᵀ)ᵀ, the weight first: OpenVINO's CPU plug-in shares one
    repacked weight between Gemms that read it with opposite transB, and silently computes g·op(W)
    instead when W is square. When x is transposed (transA=1), op(W)·gᵀ is Fᵀ(g) itself.
    """

    def __init__(self, b, unit):
        head = unit.head
        self.trans_a, self.trans_b = head.attrs.get("transA", 0), head.attrs.get("transB", 0)
        super().__init__(
            b,
            unit,
            lambda s: s.reshape(-1, 1) if self.trans_b else s,
            base_scale=head.attrs.get("alpha", 1.0),
            bias_factor=head.attrs.get("beta", 1.0),
        )

    def emit_forward(self, b, x, weight, bias):
        return b.op("Gemm", x, weight, bias, transA=self.trans_a, transB=self.trans_b)

    def transpose(self, b, g, weight):
        transposed = b.op("Gemm", weight, g, transA=self.trans_b, transB=1)
        return transposed if self.trans_a else b.op("Transpose", transposed, perm=[1, 0])


class MatMulMap(_WeightedMap):
    """MatMul x·W with a constant 2-D W, plus the bias Add that follows it. Fᵀ(g) = g·Wᵀ, emitted
    weight first for OpenVINO (see GemmMap), as a Gemm over g's rows, (W·g₂ᵀ)ᵀ with g₂ = g as
    [rows, out]: as a MatMul of transposed activations ONNX Runtime fuses it into a FusedMatMul
    that ran vit_b_16's explainer at half speed."""

    def __init__(self, b, unit):
        super().__init__(b, unit, lambda s: s)

    def emit_forward(self, b, x, weight, bias):
        z = b.op("MatMul", x, weight)
        return z if bias is None else b.add(z, bias)

    def transpose(self, b, g, weight):
        if self.input_rank == 1:
            return b.op("MatMul", weight, g)
        rows = g if self.input_rank == 2 else b.op("Reshape", g, b.ints([-1, self.unit.head.inputs[1].shape[1]]))
        transposed = b.op("Transpose", b.op("Gemm", weight, rows, transB=1), perm=[1, 0])
        return transposed if self.input_rank == 2 else b.reshape_like(transposed, self.x)


class ChannelAffineMap(LinearMap):
    """An unmerged BatchNormalization as the per-channel map y = s·x + t (channel axis 1)."""

    def __init__(self, b, unit):
        super().__init__(unit)
        s, t = batch_norm_affine(unit.head)
        trailing = [1] * max(self.input_rank - 2, 0)
        self.weight = b.const(s.reshape([-1] + trailing))
        self.bias = b.const(t.reshape([-1] + trailing))

    def emit_forward(self, b, x, weight, bias):
        z = b.mul(x, weight)
        return z if bias is None else b.add(z, bias)

    def transpose(self, b, g, weight):
        return b.mul(g, weight)


def conv_attrs(unit):
    """Explicit Conv attributes; auto_pad SAME_* is resolved to pads from the static input shape."""
    head = unit.head
    return dict(window_attrs(unit, list(head.inputs[1].values.shape[2:])), group=head.attrs.get("group", 1))


def window_attrs(unit, kernel):
    """Strides, pads, dilations and kernel of a sliding-window op (Conv, MaxPool), with auto_pad
    resolved to explicit pads from the static input shape."""
    head = unit.head
    spatial = len(kernel)
    strides = head.attrs.get("strides", [1] * spatial)
    dilations = head.attrs.get("dilations", [1] * spatial)
    pads = list(head.attrs.get("pads", [0] * 2 * spatial))
    auto_pad = head.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "VALID":
        pads = [0] * 2 * spatial
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = static_spatial(unit)
        pads = [0] * 2 * spatial
        for i, (n, s, k, d) in enumerate(zip(sizes, strides, kernel, dilations)):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return {"strides": list(strides), "pads": pads, "dilations": list(dilations), "kernel_shape": list(kernel)}


def same_padding_problem(unit):
    """Why auto_pad SAME cannot be resolved to pads (they depend on a size the file leaves dynamic), or None."""
    auto_pad = unit.head.attrs.get("auto_pad", "NOTSET")
    shape = unit.inputs[0].shape
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", b"SAME_UPPER", b"SAME_LOWER") and (
        shape is None or not all(isinstance(d, int) for d in shape[2:])
    ):
        return f"auto_pad SAME needs a static spatial input shape, got {shape}; {SHAPE_HINT}"
    return None


def static_spatial(unit):
    problem = same_padding_problem(unit)
    if problem:
        raise UnsupportedModelError(f"node {unit.name!r} ({unit.op}): {problem}")
    return unit.inputs[0].shape[2:]


def strided_transpose(b, g, weight, attrs, x):
    """ConvTranspose(g; W) landing exactly on x's size. With static sizes: the rows a strided
    window never reads (``unread_rows``) as its output_padding. With sizes known only at run time
    (a dynamic image): the transpose without its end pads, which ends at the last row a window
    reads, then padded with zeros, or cropped, to x's size: Shape(x) − Shape(transpose) rows at
    the end of each axis (a negative pad crops)."""
    sizes = x.shape[2:] if x.shape is not None else None
    if sizes is not None and all(isinstance(d, int) for d in sizes):
        return b.op("ConvTranspose", g, weight, **attrs, output_padding=unread_rows(sizes, attrs))
    spatial = len(attrs["strides"])
    transposed = b.op("ConvTranspose", g, weight, **dict(attrs, pads=attrs["pads"][:spatial] + [0] * spatial))
    sizes_of = lambda t: b.op("Slice", b.shape(t), b.ints([2]), b.ints([2 + spatial]))
    missing = b.sub(sizes_of(x), sizes_of(transposed))
    return b.op("Pad", transposed, b.op("Concat", b.ints([0] * (spatial + 4)), missing, axis=0))


def unread_rows(sizes, attrs):
    """Rows a strided window never reads, per axis: n + p_begin + p_end − ((k−1)·d + 1) − (out−1)·s.
    The transpose needs them as output_padding to land exactly on the input's size."""
    spatial = len(attrs["strides"])
    dilations = attrs.get("dilations", [1] * spatial)
    return [
        (n + attrs["pads"][i] + attrs["pads"][i + spatial] - ((attrs["kernel_shape"][i] - 1) * dilations[i] + 1))
        % attrs["strides"][i]
        for i, n in enumerate(sizes)
    ]


LINEAR_MAPS = {"Conv": ConvMap, "ConvTranspose": ConvTransposeMap, "Gemm": GemmMap, "MatMul": MatMulMap}


def linear_map(b, unit):
    return LINEAR_MAPS[unit.op](b, unit)


def first_input_only(unit, layer):
    """The layer's map for the first input; the others (weights, biases) get no relevance."""
    return [layer] + [None] * (len(unit.inputs) - 1)


def check_linear(unit):
    head = unit.head
    if not is_constant(head.inputs[1]) or any(unit.relevant[1:]):
        return "the weight is not a constant initializer (only x·W with constant W is a linear layer)"
    if head.op == "Gemm" and len(head.inputs) > 2 and head.inputs[2].name and not is_constant(head.inputs[2]):
        return "Gemm's C input is not a constant bias"
    if head.op == "MatMul" and head.inputs[1].values.ndim != 2:
        return "MatMul weight must be 2-D"
    auto_pad = head.attrs.get("auto_pad", "NOTSET")
    if head.op == "ConvTranspose" and (head.attrs.get("output_shape") or auto_pad not in ("NOTSET", b"NOTSET")):
        return "ConvTranspose with output_shape or auto_pad is not supported; give explicit pads"
    return same_padding_problem(unit) if head.op == "Conv" else None


@mapped("Conv", "ConvTranspose", role="conv", traits=WEIGHTED, check=check_linear)
@mapped("Gemm", role="dense", traits=WEIGHTED, check=check_linear)
def linear_layer(b, unit):
    """R_x by the layer's rule, through F and Fᵀ of the (merged) linear map."""
    return first_input_only(unit, linear_map(b, unit))


@mapped(
    "BatchNormalization",
    role="batchnorm",
    traits=Traits(affine=True, weighted=True, elementwise=True, differentiable=True, kind="a BatchNormalization"),
)
def batch_norm(b, unit):
    """A BatchNorm with no linear layer to merge into: the per-channel map y = s·x + t (pass by default)."""
    return first_input_only(unit, ChannelAffineMap(b, unit))

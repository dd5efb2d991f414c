"""Pooling: average pooling and spatial reductions are linear maps (Norm by default), max pooling
routes relevance to the window's winner, as the gradient does."""

import numpy as np

from ..errors import SHAPE_HINT
from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..registry import mapped, routing
from .linear import first_input_only, same_padding_problem, strided_transpose, window_attrs

# Averages have no weight for rules to modify: they take the ε-rule (norm) and the chain rule.
AVERAGE = Traits(affine=True, differentiable=True, kind="an average")


class AveragePoolMap(LinearMap):
    """AveragePool as (window sum) / (divisor). Fᵀ(g) = ConvTranspose(g / divisor, ones) per channel."""

    def __init__(self, b, unit):
        super().__init__(unit)
        attrs = unit.head.attrs
        kernel = list(attrs["kernel_shape"])
        spatial = len(kernel)
        self.attrs = {
            "kernel_shape": kernel,
            "strides": list(attrs.get("strides", [1] * spatial)),
            "pads": list(attrs.get("pads", [0] * 2 * spatial)),
        }
        self.count_include_pad = attrs.get("count_include_pad", 0)
        channels = self.x.shape[1]
        self.ones = b.const(np.ones([channels, 1] + kernel, np.float32))
        self.conv = dict(self.attrs, group=channels)

    def transpose(self, b, g, weight):
        if self.count_include_pad or not any(self.attrs["pads"]):
            divisor = b.const(float(np.prod(self.attrs["kernel_shape"])))
        else:  # border windows average over the in-bounds elements only
            divisor = b.op("Conv", b.ones_per_sample(self.x), self.ones, **self.conv)
        return strided_transpose(b, b.div(g, divisor), self.ones, self.conv, self.x)


class ReduceMap(LinearMap):
    """GlobalAveragePool, ReduceMean, ReduceSum: Fᵀ(g) broadcasts g back over the reduced axes
    (divided by the number of reduced elements for a mean)."""

    def __init__(self, b, unit):
        super().__init__(unit)
        node = unit.head
        self.mean = node.op != "ReduceSum"
        if node.op == "GlobalAveragePool":
            self.axes, self.keepdims = list(range(2, self.input_rank)), 1
        else:
            self.axes = reduce_axes(node)
            if self.axes is None:
                self.axes = list(range(self.input_rank))
            self.axes = [a % self.input_rank for a in self.axes]
            self.keepdims = node.attrs.get("keepdims", 1)

    def _scale(self, b):
        """1 / (number of reduced elements) = size(output) / size(input)."""
        size = lambda t: b.op("Cast", b.op("Size", t), to=1)
        return b.div(size(self.output), size(self.x))

    def transpose(self, b, g, weight):
        if not self.keepdims:
            g = b.op("Unsqueeze", g, b.ints(self.axes))
        spread = b.op("Expand", g, b.target_shape(self.x, self.output, keep=1))
        return b.mul(spread, self._scale(b)) if self.mean else spread


def reduce_axes(node):
    """Axes of a Reduce* node: the attribute (opset < 18) or the constant second input; None = all."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1].name:
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)] or None
    return None


def _check_average_pool(unit):
    attrs = unit.head.attrs
    if attrs.get("ceil_mode", 0):
        return "AveragePool with ceil_mode=1 is not supported"
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "AveragePool with auto_pad is not supported; give explicit pads"
    if any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool with dilations is not supported"
    shape = unit.inputs[0].shape
    if shape is None or not isinstance(shape[1], int):
        return f"needs a static channel count, got {shape}; {SHAPE_HINT}"
    return None


def _check_reduce(unit):
    node = unit.head
    if len(node.inputs) > 1 and node.inputs[1].name and not is_constant(node.inputs[1]):
        return "the reduction axes are not constant"
    if node.attrs.get("noop_with_empty_axes", 0) and reduce_axes(node) is None:
        return "noop_with_empty_axes=1 with no axes is not supported"
    return None


@mapped("AveragePool", role="avgpool", traits=AVERAGE, check=_check_average_pool)
def average_pool(b, unit):
    """Norm by default: R_x = x ⊙ Pᵀ(R / stabilize(P(x)))."""
    return first_input_only(unit, AveragePoolMap(b, unit))


@mapped("GlobalAveragePool", "ReduceMean", "ReduceSum", role="avgpool", traits=AVERAGE, check=_check_reduce)
def reduction(b, unit):
    return first_input_only(unit, ReduceMap(b, unit))


def _static_spatial(unit):
    return all(
        s is not None and all(isinstance(d, int) for d in s[2:])
        for s in (unit.inputs[0].shape, unit.head.outputs[0].shape)
    )


@routing("MaxPool", check=same_padding_problem)
def max_pool(b, unit, relevance_out):
    """Winner-take-all: each window's relevance goes to its first maximum in row-major order (the
    gradient of max pooling, as PyTorch and MaxPool's Indices break ties), summed where windows overlap.

    Built from data movement and comparisons only, with no Indices output and no scatter, so that
    TensorRT and the web runtimes take it: kernel offset j reads the strided view v_j of the input
    padded with −inf, and the winner of a window is the first j with v_j = max_k v_k. Views are
    copies, not Conv patches, so the equality is exact on any runtime (TF32 or Winograd would
    round). The maximum is taken over the views rather than read from MaxPool's output, so every
    window has exactly one winner even where a runtime fuses the pool into the layer before it and
    rounds that layer differently on the two paths.
    """
    if not _static_spatial(unit):
        return [_max_pool_by_indices(b, unit, relevance_out[0])]
    x, y = b.as_float(unit.inputs[0]), unit.head.outputs[0]
    window = _Window(window_attrs(unit, list(unit.head.attrs["kernel_shape"])), x.shape[2:], y.shape[2:])
    phases = window.phases(b, x)
    views = [window.view(b, phases, offset) for offset in window.offsets]
    peak = b.op("Max", *views) if len(views) > 1 else views[0]
    shares, taken = [], None
    for view in views:
        hit = b.op("Equal", view, peak)
        won = hit if taken is None else b.op("And", hit, b.op("Not", taken))
        taken = hit if taken is None else b.op("Or", taken, hit)
        shares.append(b.mul(b.op("Cast", won, to=1), relevance_out[0]))
    return [window.place(b, shares)]


def _max_pool_by_indices(b, unit, r):
    """MaxPool's backward on sizes known only at run time (a dynamic image): the pool run again for
    its Indices (each window's first maximum, as a flat index into x), and R scatter-added onto
    them, adding where windows overlap. The same winners as the view form, which needs static
    sizes; TensorRT takes neither the Indices output nor the scatter (pin the size with --shape)."""
    attrs = {k: v for k, v in unit.head.attrs.items() if k != "storage_order"}
    x = b.as_float(unit.inputs[0])
    _, indices = b.op("MaxPool", x, outputs=2, **attrs)
    flat = lambda t: b.op("Reshape", t, b.ints([-1]))
    scattered = b.op("ScatterElements", flat(b.zeros_like(x)), flat(indices), flat(r), axis=0, reduction="add")
    return b.reshape_like(scattered, unit.inputs[0])


class _Window:
    """A pooling window's K strided views of the padded input, and their transpose.

    Along axis i, offset a = (kernel index)·d reads padded rows a + m·s, m < o. Writing a = q·s + r,
    that is row m + q of phase r, the rows r, r + s, r + 2s, … So the padded input is cut into its
    phases once (strided slices, which ONNX Runtime runs slowly, one per phase rather than one per
    offset), and each view is an unstrided slice of a phase, L = o + max(q) rows long. The
    transpose adds each share into its phase, shifted by q, and interleaves the phases again.
    """

    def __init__(self, window, sizes, out_sizes):
        self.strides, self.sizes, self.out_sizes = window["strides"], list(sizes), list(out_sizes)
        self.begin = window["pads"][: len(sizes)]
        self.offsets = [
            [k * d for k, d in zip(index, window["dilations"])] for index in np.ndindex(*window["kernel_shape"])
        ]
        most_shift = [((k - 1) * d) // s for k, d, s in zip(window["kernel_shape"], window["dilations"], self.strides)]
        self.coarse = [o + q for o, q in zip(out_sizes, most_shift)]
        # Padded rows of the phases, p + n plus the end padding; every view reads within them. The
        # input's last rows may lie past them (rows no window reads), and get no relevance.
        self.frame = [c * s for c, s in zip(self.coarse, self.strides)]
        self.axes = list(range(2, 2 + len(sizes)))

    def phases(self, b, x):
        """{phase r: rows r, r + s, … of x padded with −inf} (padding never wins, as in MaxPool)."""
        kept = [min(n, f - p) for n, f, p in zip(self.sizes, self.frame, self.begin)]
        if kept != self.sizes:
            x = b.op("Slice", x, b.ints([0] * len(kept)), b.ints(kept), b.ints(self.axes))
        end = [f - p - n for f, p, n in zip(self.frame, self.begin, kept)]
        padded = (
            x
            if not any(self.begin + end)
            else b.op("Pad", x, b.ints([0, 0] + self.begin + [0, 0] + end), b.const(-np.inf))
        )
        if all(s == 1 for s in self.strides):
            return {tuple(0 for _ in self.strides): padded}
        channels = x.shape[1] if x.shape is not None else None
        if len(self.strides) == 2 and self.strides[0] == self.strides[1] and isinstance(channels, int):
            # One SpaceToDepth, whose channel block r_h·s + r_w holds phase (r_h, r_w), then plain
            # Slices of those blocks: ONNX Runtime runs that twice as fast as s² strided Slices.
            blocks = b.op("SpaceToDepth", padded, blocksize=self.strides[0])
            return {
                phase: b.op("Slice", blocks, b.ints([k * channels]), b.ints([(k + 1) * channels]), b.ints([1]))
                for k, phase in enumerate(np.ndindex(*self.strides))
            }
        return {
            phase: b.op(
                "Slice", padded, b.ints(list(phase)), b.ints(self.frame), b.ints(self.axes), b.ints(self.strides)
            )
            for phase in np.ndindex(*self.strides)
        }

    def view(self, b, phases, offset):
        """The view at ``offset``, [N, C, o…]: rows q … q + o − 1 of phase r."""
        phase = phases[tuple(a % s for a, s in zip(offset, self.strides))]
        shift = [a // s for a, s in zip(offset, self.strides)]
        if shift == [0] * len(shift) and self.coarse == self.out_sizes:
            return phase
        ends = [q + o for q, o in zip(shift, self.out_sizes)]
        return b.op("Slice", phase, b.ints(shift), b.ints(ends), b.ints(self.axes))

    def place(self, b, shares):
        """Σ_j Fᵀ_j(share_j), cropped to the input: the transpose of every view at once."""
        phases = {}
        for offset, share in zip(self.offsets, shares):
            shift = [a // s for a, s in zip(offset, self.strides)]
            after = [c - o - q for c, o, q in zip(self.coarse, self.out_sizes, shift)]
            pads = [0, 0] + shift + [0, 0] + after
            phase = tuple(a % s for a, s in zip(offset, self.strides))
            phases.setdefault(phase, []).append(b.op("Pad", share, b.ints(pads)) if any(pads) else share)
        summed = {phase: b.total(terms) for phase, terms in phases.items()}
        frame = self._interleave(b, summed, b.zeros_like(next(iter(summed.values()))), ())
        unread = [max(p + n - f, 0) for p, n, f in zip(self.begin, self.sizes, self.frame)]
        if any(unread):
            frame = b.op("Pad", frame, b.ints([0] * (2 + len(unread)) + [0, 0] + unread))
        ends = [p + n for p, n in zip(self.begin, self.sizes)]
        return b.op("Slice", frame, b.ints(self.begin), b.ints(ends), b.ints(self.axes))

    def _interleave(self, b, phases, zeros, prefix):
        """The phases starting with ``prefix`` as rows m·s + r, one axis at a time: Concat along a
        new axis after the spatial one, then merge the two (absent phases are 0). The merged size is
        the static frame size, not −1, which an empty batch cannot infer."""
        axis = len(prefix)
        if axis == len(self.strides):
            return phases.get(prefix, zeros)
        parts = [self._interleave(b, phases, zeros, prefix + (r,)) for r in range(self.strides[axis])]
        if len(parts) == 1:
            return parts[0]
        spatial = 2 + axis
        stacked = b.op("Concat", *[b.op("Unsqueeze", p, b.ints([spatial + 1])) for p in parts], axis=spatial + 1)
        shape = b.op("Shape", stacked)
        merged = b.op(
            "Concat",
            b.op("Slice", shape, b.ints([0]), b.ints([spatial])),
            b.ints([self.frame[axis]]),
            b.op("Slice", shape, b.ints([spatial + 2]), b.ints([np.iinfo(np.int64).max])),
            axis=0,
        )
        return b.op("Reshape", stacked, merged)


@routing("GlobalMaxPool")
def global_max_pool(b, unit, relevance_out):
    """Winner-take-all over all spatial positions: ArgMax (first maximum) of each channel gets R."""
    x = b.as_float(unit.inputs[0])
    shape = b.shape(x)
    positions = b.op("ReduceProd", b.op("Slice", shape, b.ints([2]), b.ints([np.iinfo(np.int64).max])), keepdims=1)
    rows = b.op("Concat", b.op("Slice", shape, b.ints([0]), b.ints([2])), positions, axis=0)
    flat = b.op("Reshape", x, rows)
    winner = b.op("ArgMax", flat, axis=2, keepdims=1)
    r = b.op("Reshape", relevance_out[0], b.op("Shape", winner))
    scattered = b.op("ScatterElements", b.zeros_like(flat), winner, r, axis=2)
    return [b.reshape_like(scattered, x, x)]

"""Pooling: average pooling and spatial reductions are linear maps (Norm by default), max pooling
routes relevance to the window's winner, as the gradient does."""

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import is_constant
from ..maps import LinearMap, Traits
from ..registry import mapped, routing
from .linear import first_input_only, unread_rows

# Averages have no weight for rules to modify: they take the ε-rule (norm) and the chain rule.
AVERAGE = Traits(affine=True, differentiable=True, kind="an average")


class AveragePoolMap(LinearMap):
    """AveragePool as (window sum) / (divisor). Fᵀ(g) = ConvTranspose(g / divisor, ones) per channel."""

    def __init__(self, b, unit):
        super().__init__(unit)
        attrs = unit.head.attrs
        kernel = list(attrs["kernel_shape"])
        spatial = len(kernel)
        self.attrs = {"kernel_shape": kernel, "strides": list(attrs.get("strides", [1] * spatial)),
                      "pads": list(attrs.get("pads", [0] * 2 * spatial))}
        self.count_include_pad = attrs.get("count_include_pad", 0)
        channels = self.x.shape[1]
        self.ones = b.const(np.ones([channels, 1] + kernel, np.float32))
        self.conv = dict(self.attrs, group=channels)

    def transpose(self, b, g, weight):
        if self.count_include_pad or not any(self.attrs["pads"]):
            divisor = b.const(float(np.prod(self.attrs["kernel_shape"])))
        else:  # border windows average over the in-bounds elements only
            divisor = b.op("Conv", b.fill_like(self.x, 1.0), self.ones, **self.conv)
        return b.op("ConvTranspose", b.div(g, divisor), self.ones, **self.conv,
                    output_padding=unread_rows(self.x.shape[2:], self.attrs))


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
        size = (lambda t: b.op("Cast", b.op("Size", t), to=1))
        return b.div(size(self.output), size(self.x))

    def transpose(self, b, g, weight):
        if not self.keepdims:
            g = b.op("Unsqueeze", g, b.ints(self.axes))
        spread = b.op("Expand", g, b.shape(self.x))
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
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return f"needs static channel and spatial sizes, got {shape}"
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


def _check_max_pool(unit):
    if unit.head.attrs.get("storage_order", 0):
        return "MaxPool with storage_order=1 is not supported"
    return None


@routing("MaxPool", check=_check_max_pool)
def max_pool(b, unit, relevance_out):
    """Winner-take-all: R goes to the argmax of each window, summed where windows overlap.

    The forward MaxPool is given its Indices output (flat indices into N·C·H·W, first maximum on
    ties), and R is scatter-added there: the gradient of max pooling.
    """
    indices = _indices_output(b, unit.head)
    flat = b.ints([-1])
    numel = b.op("Reshape", b.op("Size", unit.inputs[0]), flat)
    zeros = b.fill(numel, 0.0)
    summed = b.op("ScatterElements", zeros, b.op("Reshape", indices, flat), b.op("Reshape", relevance_out[0], flat),
                  axis=0, reduction="add")
    return [b.reshape_like(summed, unit.inputs[0])]


def _indices_output(b, node):
    """The forward MaxPool's Indices output, added to the node if the model did not ask for it."""
    if len(node.outputs) < 2:
        node.outputs.append(gs.Variable(b.name("indices"), dtype=np.int64))
    return node.outputs[1]


@routing("GlobalMaxPool")
def global_max_pool(b, unit, relevance_out):
    """Winner-take-all over all spatial positions: ArgMax (first maximum) of each channel gets R."""
    x = unit.inputs[0]
    rows = b.op("Concat", b.op("Slice", b.shape(x), b.ints([0]), b.ints([2])), b.ints([-1]), axis=0)
    flat = b.op("Reshape", x, rows)
    winner = b.op("ArgMax", flat, axis=2, keepdims=1)
    r = b.op("Reshape", relevance_out[0], b.op("Shape", winner))
    scattered = b.op("ScatterElements", b.zeros_like(flat), winner, r, axis=2)
    return [b.reshape_like(scattered, x)]

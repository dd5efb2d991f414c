"""Random ONNX classifiers, built by hand with onnx.helper, for the reliability checks (issue 7).

One builder makes every architecture; it asks a ``Draws`` object for each structural choice, so
the same family of models comes from hypothesis (``classifiers()``: shrinkable, for CI) or from
a seeded numpy generator (``random_classifier(seed)``: for the thousands of cases of
benchmarks/random_architectures.py). Weights always come from a numpy generator whose seed is
itself a draw.

A model is an image classifier x [N, C, H, W] or a vector classifier x [N, F], with a fixed or a
dynamic ("N") batch, then a random sequence of blocks:

    image:  Conv (kernel, stride, padding, dilation, groups; bias as input, as an Add, or none)
            optionally followed by BatchNormalization (merged) and an activation; a lone
            BatchNormalization; any supported activation; MaxPool; AveragePool; GlobalAveragePool;
            a residual Add; a Concat of two branches along channels; Split → branches → Concat;
            Pad; Slice (a crop)
    vector: Gemm (transB, alpha, beta) or MatMul (+ bias Add), optionally + BatchNormalization
            and an activation; lone BatchNormalization; activations; residual Add; Concat; Split

and a head: [GlobalAveragePool | GlobalMaxPool] → Flatten → [dense + activation] → Gemm or MatMul
to [N, classes], optionally followed by Softmax.

Besides the model, the builder records every *absorbing* unit: a unit whose rule under the
"epsilon" composite does not hand on all of its relevance, because a bias or a stabilizer takes
some (see ``absorbed_relevance``), or, for Pad, because the border it added is a constant.
``measure`` and ``measure_epsilon`` convert a case, run it, and compute the figures the
reliability checks assert on.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from lrp_onnx.emit import LAYER_PREFIX

MAX_CHANNELS = 16
MAX_SIDE = 12
MAX_FEATURES = 16
MAX_DEPTH = 6
MAX_BATCH = 3
BASE_OPSET = 17
# Activations newer than opset 17 raise the model's opset to the one that defines them.
ACTIVATION_OPSETS = {"Mish": 18, "Gelu": 20}
# Every activation the converter lists (ops/elementwise.py), plus SiLU written as the gate x·σ(x).
IMAGE_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
                     "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Mish", "LRN", "SiLU")
VECTOR_ACTIVATIONS = tuple(a for a in IMAGE_ACTIVATIONS if a != "LRN")  # LRN normalises across channels of images
# f(0) ≠ 0: the activation adds a constant, as a bias does. A neuron whose z is exactly 0 (all of
# its inputs are 0) still passes f(0) on, gets relevance for it, and hands that relevance to the
# ε-stabilizer, as z + ε·sign(z) = ε. Bias-free graphs do without them (Clip's ranges hold 0).
OFFSET_ACTIVATIONS = ("Sigmoid", "HardSigmoid", "Softplus")
# Linear layers are listed twice: drawn twice as often as the other blocks.
IMAGE_BLOCKS = ("conv", "conv", "batchnorm", "activation", "maxpool", "avgpool", "globalavgpool", "residual",
                "concat", "split", "pad", "slice")
VECTOR_BLOCKS = ("dense", "dense", "batchnorm", "activation", "residual", "concat", "split")
# The checks (tests/test_random_architectures.py, benchmarks/random_architectures.py): bias-free
# graphs under "epsilon" with ε = stabilizer = BIAS_FREE_EPSILON must conserve within
# CONSERVATION_TOLERANCE of the logit; with biases, at each ε of BIASED_EPSILONS, the residual must
# match the absorbed relevance within ABSORPTION_TOLERANCE; the explainer's scores must match ORT's
# within FORWARD_TOLERANCE (max abs deviation / max abs score).
BIAS_FREE_EPSILON = 1e-9
BIASED_EPSILONS = (1e-6, 1e-3, 0.1)
CONSERVATION_TOLERANCE = 1e-5
ABSORPTION_TOLERANCE = 1e-4
FORWARD_TOLERANCE = 1e-5
# The explainer computes in float32: every relevance value carries a rounding error of a few
# units of 2⁻²⁴ ≈ 6e-8 of itself, so sums whose terms reach Σ|R| = mass are only that exact,
# however exact the rules. Each tolerance is widened by ROUNDING · mass (relative: · mass/|logit|),
# which matters only where the relevance grows far beyond the logit.
ROUNDING = 32 * 2.0**-24
# Samples whose explained logit is within LOGIT_FLOOR of 0 are not measured: a relative error
# needs a logit, and the last layer's stabilizer alone takes about ε of it (R = z there, and
# R·ε/(z + ε) ≈ ε), so at ε = 1e-9 a logit under 1e-4 could not conserve within 1e-5.
LOGIT_FLOOR = 1e-4
# One draw in UNSUPPORTED_ODDS of an eligible block (with allow_unsupported) takes an attribute
# the converter refuses: AveragePool ceil_mode=1, Pad mode "reflect".
UNSUPPORTED_ODDS = 12


# --- where the choices come from ------------------------------------------------------------------

class HypothesisDraws:
    """Choices drawn by hypothesis, which can shrink a failing architecture to a small one."""

    def __init__(self, draw):
        self._draw = draw

    def integer(self, low, high):
        return self._draw(st.integers(low, high))

    def choice(self, options):
        return self._draw(st.sampled_from(list(options)))


class SeededDraws:
    """Choices drawn uniformly from a numpy generator: case ``seed`` is always the same model."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)

    def integer(self, low, high):
        return int(self._rng.integers(low, high + 1))

    def choice(self, options):
        options = list(options)
        return options[int(self._rng.integers(len(options)))]


def _flag(draws):
    return draws.integer(0, 1) == 1


# --- what a case is -------------------------------------------------------------------------------

@dataclass
class AbsorbingUnit:
    """A unit that keeps some of the relevance at its output ``output`` under the epsilon composite.

    kind "linear": a linear layer (Conv, Gemm or MatMul with any merged bias Add and BatchNorm) under
    the ε-rule, with ``bias`` its merged bias per channel (axis 1), None if it has none;
    kind "norm": an Add of two branches or an average pooling, under Norm with the composite's
    stabilizer; kind "pad": an explicit Pad, whose border positions are ``border`` (True there,
    shaped like one sample of its output)."""
    kind: str
    output: str
    bias: Optional[np.ndarray] = None
    border: Optional[np.ndarray] = None


@dataclass
class RandomClassifier:
    model: onnx.ModelProto
    inputs: np.ndarray    # a batch to explain, standard normal
    biased: bool          # False: a bias-free graph (see build_classifier)
    description: str      # the architecture in one line
    unsupported: list     # "Op attribute" the converter must refuse, one per node
    absorbing: list       # [AbsorbingUnit], in forward order


# --- the builder ----------------------------------------------------------------------------------

class _Builder:
    """Emits nodes and initializers with fresh names; tracks the linear unit still open for merging.

    ``open_linear`` is the AbsorbingUnit of a linear layer whose output is the current tensor and
    read by nothing else yet, so that a bias Add or BatchNormalization right after it merges into
    the same unit, as graph.find_units does (Zennit's MergeBatchNorm canonizer)."""

    def __init__(self, draws, rng, biased, allow_unsupported):
        self.draws, self.rng, self.biased, self.allow_unsupported = draws, rng, biased, allow_unsupported
        self.nodes, self.initializers, self.absorbing, self.parts, self.unsupported = [], [], [], [], []
        self.opset = BASE_OPSET
        self.open_linear = None
        self._count = 0

    def fresh(self, stem):
        self._count += 1
        return f"{stem}{self._count}"

    def const(self, stem, value, dtype=np.float32):
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        """One node with one output; it reads the current tensor, so no follower can merge past it."""
        out = self.fresh("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(op.lower()), **attrs))
        self.open_linear = None
        return out

    def rare(self, attribute):
        """True once in UNSUPPORTED_ODDS draws, and only when unsupported attributes are allowed:
        then ``attribute`` is recorded as one the converter must refuse."""
        if self.allow_unsupported and self.draws.integer(1, UNSUPPORTED_ODDS) == 1:
            self.unsupported.append(attribute)
            return True
        return False

    def bias(self, channels, scale=0.3):
        """A random bias (float32 values, as stored), or None in a bias-free graph."""
        if not self.biased:
            return None
        return self.rng.normal(0.0, scale, channels).astype(np.float32).astype(np.float64)

    # --- linear layers ----------------------------------------------------------------------------

    def linear(self, z, bias):
        """Register a linear layer's output; a bias (or BatchNorm) may still merge into it."""
        unit = AbsorbingUnit("linear", z, None if bias is None else np.asarray(bias, np.float64))
        self.absorbing.append(unit)
        self.open_linear = unit
        return z

    def bias_add(self, z, bias, shape):
        """z + b as a separate Add with a per-channel constant, merged into the layer before it."""
        unit = self.open_linear
        b = self.const("b", bias.reshape([-1] + [1] * (len(shape) - 1)))
        out = self.node("Add", [z, b] if _flag(self.draws) else [b, z])
        unit.output = out
        unit.bias = bias if unit.bias is None else unit.bias + bias
        self.open_linear = unit
        return out

    def conv(self, x, shape, channels=None, same=False):
        """Conv with random kernel, stride, padding, dilation and groups; ``same`` keeps H×W
        (stride 1, odd kernel, padding (k−1)/2·d). Bias: Conv's input, a separate Add, or none."""
        c_in, h, w = shape
        draws = self.draws
        group = 1
        if channels is None:
            if c_in > 1 and draws.integer(1, 4) == 1:
                group = draws.choice([g for g in range(2, c_in + 1) if c_in % g == 0])
                channels = group * draws.integer(1, MAX_CHANNELS // group)
            else:
                channels = draws.integer(1, MAX_CHANNELS)
        if same:  # every window is centred on an input element
            kernel, strides, dilation = [draws.choice([1, 3, 5])] * 2, [1, 1], draws.choice([1, 1, 1, 2])
            pads = [(kernel[0] - 1) // 2 * dilation] * 4
        else:
            kernel = [draws.choice([1, 2, 3, 5]) for _ in range(2)]
            strides = [draws.choice([1, 1, 2, 3]) for _ in range(2)]
            dilation = _dilation(draws, kernel, [h, w])
            pads = _window_pads(draws, [(k - 1) * dilation + 1 for k in kernel], [h, w])
        fan_in = c_in // group * kernel[0] * kernel[1]
        weight = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (channels, c_in // group) + tuple(kernel))
        bias = self.bias(channels)
        form = draws.choice(["input", "add"]) if bias is not None else "none"
        inputs = [x, self.const("w", weight)] + ([self.const("b", bias)] if form == "input" else [])
        z = self.node("Conv", inputs, kernel_shape=kernel, strides=strides, pads=pads, dilations=[dilation] * 2,
                      group=group)
        out_shape = (channels,) + tuple(_window_out(n, k, s, p0, p1, dilation)
                                        for n, k, s, p0, p1 in zip((h, w), kernel, strides, pads[:2], pads[2:]))
        self.linear(z, bias if form == "input" else None)
        self.parts.append(f"conv{kernel[0]}x{kernel[1]}/s{strides[0]}{strides[1]}/p{''.join(map(str, pads))}"
                          f"/d{dilation}/g{group}→{channels}{'+b' if bias is not None else ''}")
        if form == "add":
            z = self.bias_add(z, bias, out_shape)
        return z, out_shape

    def dense(self, x, features, outputs=None):
        """Gemm (transB, alpha, beta) or MatMul + bias Add, [N, features] -> [N, outputs]."""
        draws = self.draws
        outputs = outputs or draws.integer(1, MAX_FEATURES)
        weight = self.rng.normal(0.0, np.sqrt(2.0 / features), (features, outputs))
        bias = self.bias(outputs)
        if _flag(draws):
            trans_b = draws.integer(0, 1)
            alpha, beta = draws.choice([1.0, 1.0, 0.5]), draws.choice([1.0, 1.0, 2.0])
            inputs = [x, self.const("w", weight.T / alpha if trans_b else weight / alpha)]
            if bias is not None:
                inputs.append(self.const("c", bias / beta))
            z = self.node("Gemm", inputs, transB=trans_b, alpha=alpha, beta=beta)
            self.parts.append(f"gemm{'T' if trans_b else ''}→{outputs}{'+b' if bias is not None else ''}")
            return self.linear(z, bias), (outputs,)
        z = self.linear(self.node("MatMul", [x, self.const("w", weight)]), None)
        self.parts.append(f"matmul→{outputs}{'+b' if bias is not None else ''}")
        if bias is not None:
            z = self.bias_add(z, bias, (outputs,))
        return z, (outputs,)

    def batch_norm(self, x, shape):
        """Inference BatchNorm y = γ(x − μ)/√(σ² + eps) + β: merged into an open linear layer as
        s = γ/√(σ²+eps), t = β − μ·s; otherwise its own unit (Pass under every composite)."""
        channels = shape[0]
        gamma, var = (self.rng.uniform(0.5, 1.5, channels).astype(np.float32) for _ in range(2))
        mean, beta = (self.rng.normal(0.0, 0.3, channels).astype(np.float32) if self.biased
                      else np.zeros(channels, np.float32) for _ in range(2))
        eps = 1e-5
        unit = self.open_linear
        inputs = [x] + [self.const(stem, v) for stem, v in (("gamma", gamma), ("beta", beta), ("mean", mean),
                                                              ("var", var))]
        out = self.node("BatchNormalization", inputs, epsilon=eps)
        self.parts.append("bn")
        if unit is not None:
            s = gamma / np.sqrt(var.astype(np.float64) + eps)
            t = beta - mean * s
            unit.output, unit.bias = out, t if unit.bias is None else unit.bias * s + t
            self.open_linear = unit
        return out

    # --- activations and pooling ------------------------------------------------------------------

    def activation(self, x, shape, op=None):
        """A random activation; bias-free graphs leave out those with f(0) ≠ 0 (OFFSET_ACTIVATIONS)."""
        op = op or self.draws.choice([a for a in (IMAGE_ACTIVATIONS if len(shape) == 3 else VECTOR_ACTIVATIONS)
                                      if self.biased or a not in OFFSET_ACTIVATIONS])
        self.opset = max(self.opset, ACTIVATION_OPSETS.get(op, BASE_OPSET))
        self.parts.append(op)
        rng = self.rng
        if op == "SiLU":  # the gate x·σ(x): relevance goes to x alone
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if op == "PRelu":
            slope = rng.uniform(0.0, 0.5, (shape[0],) + (1,) * (len(shape) - 1))
            return self.node("PRelu", [x, self.const("slope", slope)])
        if op == "Clip":
            low, high = self.draws.choice([(-1.0, 1.0), (0.0, 6.0), (-0.5, 3.0)])
            return self.node("Clip", [x, self.const("lo", low), self.const("hi", high)])
        attrs = {"LeakyRelu": {"alpha": float(rng.uniform(0.01, 0.3))}, "Elu": {"alpha": float(rng.uniform(0.5, 1.5))},
                 "Celu": {"alpha": float(rng.uniform(0.5, 1.5))},
                 "Gelu": {"approximate": self.draws.choice(["none", "tanh"])},
                 "LRN": {"size": self.draws.choice([1, 3, 5]), "alpha": 1e-2, "beta": 0.75, "bias": 1.0}}.get(op, {})
        return self.node(op, [x], **attrs)

    def pool_window(self):
        """A pooling kernel and strides, each [2], drawn the same way for every pool."""
        return [self.draws.choice([1, 2, 3]) for _ in range(2)], [self.draws.choice([1, 2, 2, 3]) for _ in range(2)]

    def max_pool(self, x, shape):
        c, h, w = shape
        draws = self.draws
        kernel, strides = self.pool_window()
        dilation = _dilation(draws, kernel, [h, w])
        # ORT wants pooling pads below the kernel: a dilated window (wider than its kernel) gets none
        pads = _window_pads(draws, kernel, [h, w]) if dilation == 1 else [0] * 4
        out = self.node("MaxPool", [x], kernel_shape=kernel, strides=strides, pads=pads, dilations=[dilation] * 2)
        self.parts.append(f"maxpool{kernel[0]}x{kernel[1]}/s{strides[0]}{strides[1]}/p{''.join(map(str, pads))}"
                          f"/d{dilation}")
        return out, (c,) + tuple(_window_out(n, k, s, p0, p1, dilation)
                                 for n, k, s, p0, p1 in zip((h, w), kernel, strides, pads[:2], pads[2:]))

    def average_pool(self, x, shape):
        c, h, w = shape
        draws = self.draws
        kernel, strides = self.pool_window()
        pads = _window_pads(draws, kernel, [h, w])
        count_include_pad = draws.integer(0, 1)
        out_shape = (c,) + tuple(_window_out(n, k, s, p0, p1)
                                 for n, k, s, p0, p1 in zip((h, w), kernel, strides, pads[:2], pads[2:]))
        # ceil_mode=1 is refused by the converter; drawn only where it gives the same size as floor.
        exact = all((n + p0 + p1 - k) % s == 0 for n, k, s, p0, p1 in zip((h, w), kernel, strides, pads[:2], pads[2:]))
        ceil_mode = 1 if exact and self.rare("AveragePool ceil_mode=1") else 0
        out = self.node("AveragePool", [x], kernel_shape=kernel, strides=strides, pads=pads,
                        count_include_pad=count_include_pad, ceil_mode=ceil_mode)
        self.absorbing.append(AbsorbingUnit("norm", out))
        self.parts.append(f"avgpool{kernel[0]}x{kernel[1]}/s{strides[0]}{strides[1]}/p{''.join(map(str, pads))}"
                          f"{'/incl' if count_include_pad else ''}{'/ceil' if ceil_mode else ''}")
        return out, out_shape

    def global_pool(self, x, shape, op):
        out = self.node(op, [x])
        if op == "GlobalAveragePool":
            self.absorbing.append(AbsorbingUnit("norm", out))
        self.parts.append(op.replace("Global", "g").lower())
        return out, (shape[0], 1, 1)

    # --- routing --------------------------------------------------------------------------------------

    def pad(self, x, shape):
        """Constant zero padding of H and W (the border is a constant: see AbsorbingUnit), or
        rarely mode "reflect", which the converter refuses."""
        c, h, w = shape
        spatial = [self.draws.integer(0, 2) for _ in range(4)]
        mode = "reflect" if min(h, w) > max(spatial) and self.rare("Pad mode reflect") else "constant"
        pads = [0, 0] + spatial[:2] + [0, 0] + spatial[2:]
        out = self.node("Pad", [x, self.const("pads", pads, np.int64)], mode=mode)
        out_shape = (c, h + spatial[0] + spatial[2], w + spatial[1] + spatial[3])
        border = np.ones(out_shape, bool)
        border[:, spatial[0]:spatial[0] + h, spatial[1]:spatial[1] + w] = False
        self.absorbing.append(AbsorbingUnit("pad", out, border=border))
        self.parts.append(f"pad{''.join(map(str, spatial))}{'/reflect' if mode != 'constant' else ''}")
        return out, out_shape

    def crop(self, x, shape):
        """Slice a border of 1 off H and W (the tensor must be at least 3×3)."""
        c, h, w = shape
        out = self.node("Slice", [x, self.const("starts", [1, 1], np.int64), self.const("ends", [-1, -1], np.int64),
                                  self.const("axes", [2, 3], np.int64)])
        self.parts.append("crop")
        return out, (c, h - 2, w - 2)

    # --- branching ----------------------------------------------------------------------------------

    def shape_preserving(self, x, shape, channels=None):
        """A branch body that keeps H×W (or the feature count): a "same" Conv or a dense layer,
        optionally + BatchNorm, + an activation. ``channels`` fixes the output channels."""
        if len(shape) == 3:
            y, shape = self.conv(x, shape, channels or shape[0], same=True)
        else:
            y, shape = self.dense(x, shape[0], channels or shape[0])
        if _flag(self.draws):
            y = self.batch_norm(y, shape)
        if _flag(self.draws):
            y = self.activation(y, shape)
        return y, shape

    def residual(self, x, shape):
        """x + body(x), body one or two shape-preserving layers: Norm splits R between the two."""
        self.parts.append("residual(")
        self.open_linear = None  # x is read twice: nothing merges into its layer any more
        y, _ = self.shape_preserving(x, shape)
        if _flag(self.draws):
            y, _ = self.shape_preserving(y, shape)
        self.parts.append(")")
        out = self.node("Add", [x, y] if _flag(self.draws) else [y, x])
        self.absorbing.append(AbsorbingUnit("norm", out))
        return out, shape

    def concat(self, x, shape):
        """Concat along channels of two branches of x, each x itself or a shape-preserving layer."""
        self.parts.append("concat(")
        self.open_linear = None
        pieces = []
        room = MAX_CHANNELS if len(shape) == 3 else MAX_FEATURES
        for branch in range(2):
            left = room - sum(s[0] for _, s in pieces) - (1 if branch == 0 else 0)
            if _flag(self.draws) and shape[0] <= left:
                self.parts.append("identity")
                pieces.append((x, shape))
            else:
                pieces.append(self.shape_preserving(x, shape, self.draws.integer(1, left)))
            self.parts.append("|" if branch == 0 else ")")
        out = self.node("Concat", [p for p, _ in pieces], axis=1)
        return out, (sum(s[0] for _, s in pieces),) + shape[1:]

    def split(self, x, shape):
        """Split channels in two, a shape-preserving layer or an activation on each, Concat back."""
        first = self.draws.integer(1, shape[0] - 1)
        sizes = [first, shape[0] - first]
        a, b = self.fresh("t"), self.fresh("t")
        self.nodes.append(helper.make_node("Split", [x, self.const("split", sizes, np.int64)], [a, b],
                                           name=self.fresh("split"), axis=1))
        self.open_linear = None
        self.parts.append("split(")
        outs = []
        for piece, size in zip((a, b), sizes):
            piece_shape = (size,) + shape[1:]
            if _flag(self.draws):
                outs.append(self.shape_preserving(piece, piece_shape)[0])
            else:
                outs.append(self.activation(piece, piece_shape))
            self.parts.append("|" if len(outs) == 1 else ")")
        return self.node("Concat", outs, axis=1), shape

    # --- blocks -------------------------------------------------------------------------------------

    def block(self, x, shape):
        """One randomly chosen block that fits the current shape."""
        image = len(shape) == 3
        kinds = [k for k in (IMAGE_BLOCKS if image else VECTOR_BLOCKS)
                 if not (k == "split" and shape[0] < 2) and not (k == "slice" and min(shape[1:]) < 3)
                 and not (k == "pad" and not self.biased)]
        kind = self.draws.choice(kinds)
        if kind in ("conv", "dense"):
            y, shape = self.conv(x, shape) if image else self.dense(x, shape[0])
            if _flag(self.draws):
                y = self.batch_norm(y, shape)
            if _flag(self.draws):
                y = self.activation(y, shape)
            return y, shape
        if kind == "batchnorm":
            return self.batch_norm(x, shape), shape
        if kind == "activation":
            return self.activation(x, shape), shape
        return {"maxpool": self.max_pool, "avgpool": self.average_pool, "residual": self.residual,
                "concat": self.concat, "split": self.split, "pad": self.pad, "slice": self.crop,
                "globalavgpool": lambda t, s: self.global_pool(t, s, "GlobalAveragePool")}[kind](x, shape)

    def head(self, x, shape, classes):
        """[global pooling] → Flatten → [dense + activation] → dense to the class scores."""
        if len(shape) == 3:
            pool = self.draws.choice([None, "GlobalAveragePool", "GlobalMaxPool"])
            if pool:
                x, shape = self.global_pool(x, shape, pool)
            x = self.node("Flatten", [x], axis=1)
            shape = (int(np.prod(shape)),)
            self.parts.append("flatten")
        if _flag(self.draws):
            x, shape = self.dense(x, shape[0])
            x = self.activation(x, shape)
        return self.dense(x, shape[0], classes)[0]


def _window_out(n, kernel, stride, pad_begin, pad_end, dilation=1):
    """Output size of a sliding window: ⌊(n + p_begin + p_end − ((k−1)·d + 1)) / s⌋ + 1."""
    return (n + pad_begin + pad_end - ((kernel - 1) * dilation + 1)) // stride + 1


def _dilation(draws, kernel, sizes):
    """2 (one draw in four) where the dilated window, (k−1)·2 + 1 wide, fits the input on both axes;
    else 1. A dilated window wider than the input could straddle it and read padding only: z = 0
    whatever the input, which in a bias-free graph leaves no way to explain the output."""
    dilation = draws.choice([1, 1, 1, 2])
    return dilation if all((k - 1) * dilation + 1 <= n for k, n in zip(kernel, sizes)) else 1


def _window_pads(draws, reach, sizes):
    """[begin_h, begin_w, end_h, end_w] with begin + end ≤ reach − 1 per axis, reach = (k−1)·d + 1,
    and n + begin + end ≥ reach: one window fits, the output is no larger than the input, and no
    pooling window lies wholly in the padding."""
    begins, ends = [], []
    for r, n in zip(reach, sizes):
        begin = draws.integer(0, r - 1)
        begins.append(begin)
        ends.append(draws.integer(max(0, r - n - begin), r - 1 - begin))
    return begins + ends


def build_classifier(draws, biased=None, allow_unsupported=False):
    """A RandomClassifier from ``draws`` (HypothesisDraws or SeededDraws).

    ``biased``: None draws it; False makes a bias-free graph, free of constants, F(0) = 0: no
    Conv/Gemm bias, no bias Add, BatchNorms with μ = β = 0 (a pure scale), no explicit Pad (its
    border is a constant), and no activation with f(0) ≠ 0 (OFFSET_ACTIVATIONS).
    ``allow_unsupported`` lets a few blocks take attributes the converter refuses (UNSUPPORTED_ODDS).
    """
    biased = _flag(draws) if biased is None else biased
    rng = np.random.default_rng(draws.integer(0, 2**32 - 1))
    builder = _Builder(draws, rng, biased, allow_unsupported)
    image = _flag(draws)
    batch = draws.integer(1, MAX_BATCH)
    dynamic = _flag(draws)
    if image:
        shape = (draws.integer(1, 4), draws.integer(3, MAX_SIDE), draws.integer(3, MAX_SIDE))
    else:
        shape = (draws.integer(1, MAX_FEATURES),)
    x_shape = (batch,) + shape
    builder.parts.append(f"x[{'N' if dynamic else batch},{','.join(map(str, shape))}]")
    x = "x"
    for _ in range(draws.integer(0, MAX_DEPTH)):
        x, shape = builder.block(x, shape)
    classes = draws.integer(2, 10)
    logits = builder.head(x, shape, classes)
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N" if dynamic else batch, classes])]
    if _flag(draws):
        probabilities = builder.node("Softmax", [logits], axis=1)
        outputs = [helper.make_tensor_value_info(probabilities, TensorProto.FLOAT,
                                                 ["N" if dynamic else batch, classes])]
        builder.parts.append("softmax")
    builder.parts.append(f"→{classes}")
    graph = helper.make_graph(builder.nodes, "random_classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N" if dynamic else batch] + list(x_shape[1:]))],
                              outputs, builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", builder.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    inputs = rng.standard_normal(x_shape).astype(np.float32)
    return RandomClassifier(model, inputs, biased, " ".join(builder.parts), builder.unsupported, builder.absorbing)


@st.composite
def classifiers(draw, biased=None, allow_unsupported=False):
    """Hypothesis strategy of RandomClassifier (see build_classifier for the parameters)."""
    return build_classifier(HypothesisDraws(draw), biased, allow_unsupported)


def random_classifier(seed, biased=None, allow_unsupported=False):
    """The RandomClassifier of case ``seed``, without hypothesis (for runs of thousands)."""
    return build_classifier(SeededDraws(seed), biased, allow_unsupported)


# --- measuring a case -----------------------------------------------------------------------------

@dataclass
class Measurement:
    """What one explained batch shows. Errors are per sample, over the *measured* samples, those
    whose explained logit is not ~0 (|logit| > LOGIT_FLOOR): a relative error needs a logit."""
    forward_deviation: float        # max |explainer's score − model's score| / max |model's score|
    relevance: np.ndarray           # at the input, [N, ...]
    logit: np.ndarray               # [N], the explained logit (the predicted class's)
    absorbed: Optional[np.ndarray]  # [N], what biases, stabilizers and Pad borders absorb ("epsilon" only)
    mass: np.ndarray                # [N], the largest Σ|R| at the input or at an absorbing unit's output

    @property
    def finite(self):
        return bool(np.isfinite(self.relevance).all())

    @property
    def measured(self):
        return np.abs(self.logit) > LOGIT_FLOOR

    @property
    def residual(self):
        """logit − Σ R, the relevance that did not reach the input."""
        return (self.logit - self.relevance.reshape(len(self.relevance), -1).sum(1))[self.measured]

    @property
    def conservation_error(self):
        """|logit − Σ R| / |logit|."""
        return np.abs(self.residual) / np.abs(self.logit[self.measured])

    @property
    def absorption_error(self):
        """|(logit − Σ R) − absorbed| / |logit|: the residual against its account."""
        return np.abs(self.residual - self.absorbed[self.measured]) / np.abs(self.logit[self.measured])

    @property
    def amplification(self):
        """mass / |logit|: how far the relevance outgrows the logit on its way down (ε-rule
        denominators near 0, sums of branches that cancel)."""
        return self.mass[self.measured] / np.abs(self.logit[self.measured])

    def allowance(self, tolerance):
        """``tolerance`` plus the relative error float32 cannot avoid: ROUNDING · amplification."""
        return tolerance + ROUNDING * self.amplification


def measure(case, composite):
    """Convert ``case`` under ``composite`` with its default parameters and explain its inputs
    (predicted class) on ONNX Runtime. Conversion errors propagate."""
    return _measure(case, composite, {}, accounted=False)


def measure_epsilon(case, epsilon):
    """As ``measure``, under "epsilon" with ε = stabilizer = ``epsilon`` (linear layers and Norm
    units alike), and with the residual accounted for: the relevance at every absorbing unit is
    requested (``layers=``) and ``absorbed_relevance`` computed from it."""
    return _measure(case, "epsilon", {"epsilon": epsilon, "stabilizer": epsilon}, accounted=True)


def _measure(case, composite, rule_params, accounted):
    layers = [unit.output for unit in case.absorbing] if accounted else []
    explainer = lrp_onnx.convert(case.model, composite, layers=layers, **rule_params)
    # z at the absorbing units comes from the explainer's own forward pass (the model's, checked
    # below): R (b + ε·σ) / (z + ε·σ) is ill-conditioned near z = 0, where another session's
    # rounding of z would show up as a difference.
    named = lrp_onnx.Explainer(_with_outputs(explainer, layers), providers="cpu", threads=1).run(case.inputs)
    named = {name: value.astype(np.float64) for name, value in named.items()}
    relevance = named["relevance"]
    relevance_at = {name: named[LAYER_PREFIX + name] for name in layers}
    mass = np.max([np.abs(r).reshape(len(r), -1).sum(1) for r in [relevance, *relevance_at.values()]], axis=0)
    score = case.model.graph.output[0].name
    expected = _run_original(case)[0].astype(np.float64)
    deviation = float(np.abs(named[score] - expected).max() / max(np.abs(expected).max(), 1e-30))
    absorbed = absorbed_relevance(case, named, relevance_at, rule_params["epsilon"], rule_params["stabilizer"]) \
        if accounted else None
    return Measurement(deviation, relevance, named["explained_logit"], absorbed, mass)


def _with_outputs(model, names):
    """A copy of ``model`` with the float tensors ``names`` among its graph outputs."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    known = {o.name for o in model.graph.output}
    extended.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                 for name in dict.fromkeys(names) if name not in known)
    return extended


def _run_original(case):
    """The original model's outputs on ORT's CPU provider."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": case.inputs})


def absorbed_relevance(case, values, relevance_at, epsilon, stabilizer):
    """Per sample, the relevance the epsilon composite does not hand down to the input, from
    ``values`` (z at each absorbing unit's output, by name) and ``relevance_at`` (R there).

    Every unit but the absorbing ones hands on exactly what it gets: activations (the SiLU gate
    included) and lone BatchNorms take Pass; Flatten, Concat, Split, Slice and max pooling route.
    A linear unit z = F(x) + b under the ε-rule gives
    R_i = x_i Σ_j ∂F_j/∂x_i · R_j / (z_j + ε·σ_j) with σ_j = sign(z_j), sign(0) = +1; as
    Σ_i x_i ∂F_j/∂x_i = F_j(x) = z_j − b_j (F linear), its input keeps Σ_j R_j (z_j − b_j)/(z_j + ε·σ_j)
    and the unit absorbs

        Σ_j R_j − Σ_j R_j (z_j − b_j)/(z_j + ε·σ_j) = Σ_j R_j (b_j + ε·σ_j) / (z_j + ε·σ_j).

    A Norm unit (a sum of two branches, average pooling) is the same with b = 0 and the
    composite's ``stabilizer`` for ε. A Pad absorbs the relevance at its border: those positions
    hold the padding constant, not an input element.
    """
    total = np.zeros(len(case.inputs))
    for unit in case.absorbing:
        z, r = values[unit.output], relevance_at[unit.output]
        if unit.kind == "pad":
            absorbed = r * unit.border
        else:
            eps = epsilon if unit.kind == "linear" else stabilizer
            sigma = np.where(z >= 0, 1.0, -1.0)
            bias = 0.0 if unit.bias is None else unit.bias.reshape([1, -1] + [1] * (z.ndim - 2))
            absorbed = r * (bias + eps * sigma) / (z + eps * sigma)
        total += absorbed.reshape(len(total), -1).sum(1)
    return total

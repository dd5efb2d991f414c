"""ONNX Runtime's fused transformer ops, written out in the standard ops they stand for.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``)
replaces a transformer's sub-graphs by com.microsoft contrib ops: Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu and more. The load step ``expand_fused_ops`` writes each one back
as the standard ops it is defined by (ONNX Runtime's ContribOperators documentation), in the
order an unfused export computes them: the q/k/v projections, the scaled scores, the mask added,
Softmax, the product with v; the residual sum, then LayerNormalization; x·Φ(x) for GELU. The
rules then see the MatMuls, Softmax, normalisations and gates they are written for, each rule
written once, and the explainer of an optimized model is the explainer of the unoptimized one.

The explainer keeps the expanded ops in its forward too, rather than the fused kernels: it then
uses standard ops only, so it runs wherever the unoptimized model does (OpenVINO, the browser,
TensorRT), and its outputs equal the fused model's to float rounding, not bit for bit. Keeping the
fused kernels would speed up only the forward, which is a fraction of an explainer's run.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelLoadError, UnsupportedModelError
from .ops.elementwise import GELU_TANH_CUBIC

MICROSOFT = "com.microsoft"
SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))
# The first opset whose op takes its axes (Split: its sizes) as an input, not an attribute
AXES_AS_INPUT = {"Unsqueeze": 13, "ReduceSum": 13, "ReduceMean": 18, "Split": 13}
LAYER_NORMALIZATION_OPSET = 17
# ORT's defaults, measured: the schemas' attribute defaults differ from op to op
DEFAULT_EPSILON = {
    "SkipLayerNormalization": 1e-12,
    "SkipSimplifiedLayerNormalization": 1e-12,
    "EmbedLayerNormalization": 1e-12,
    "SimplifiedLayerNormalization": 1e-5,
    "LayerNormalization": 1e-5,
}


class Expansion:
    """The standard nodes and constants that stand for one fused node; every name they add starts
    with the fused node's name."""

    def __init__(self, node, opset, facts):
        self.node, self.opset, self.facts = node, opset, facts
        self.name = node.name or f"{node.op_type}_{node.output[0]}"
        self.nodes, self.constants = [], []
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # the type of the float values the node computes, which its constants take: float16 in a model
        # converted after optimization (onnxruntime.transformers' convert_float_to_float16)
        self.float_type = facts.float_type_of(node) or TensorProto.FLOAT
        self.dtype = helper.tensor_dtype_to_np_dtype(self.float_type)

    def input(self, k):
        """The fused node's input k, "" where it is absent."""
        return self.node.input[k] if k < len(self.node.input) else ""

    def output(self, k):
        """The fused node's output k, "" where it is absent or nothing reads it."""
        name = self.node.output[k] if k < len(self.node.output) else ""
        return name if name in self.facts.read else ""

    def op(self, op_type, *inputs, out=None, outputs=1, **attrs):
        """Add a standard node; its output names (``out`` names the first), one name if outputs == 1."""
        index = len(self.nodes)
        names = [out or f"{self.name}/{op_type}_{index}"] + [
            f"{self.name}/{op_type}_{index}:{k}" for k in range(1, outputs)
        ]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=f"{self.name}/{op_type}_{index}", **attrs)
        )
        return names[0] if outputs == 1 else names

    def const(self, values, dtype=None):
        """A constant, of the node's float type unless ``dtype`` says otherwise."""
        dtype = dtype or self.dtype
        name = f"{self.name}/const_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def along(self, op_type, x, axes, **attrs):
        """``op_type`` on ``axes`` (Split: sizes), an input or an attribute as the model's opset has it."""
        if self.opset >= AXES_AS_INPUT[op_type]:
            return self.op(op_type, x, self.const(axes, np.int64), **attrs)
        return self.op(op_type, x, **{"split" if op_type == "Split" else "axes": list(axes)}, **attrs)

    def thirds(self, x, axis):
        """x split in three equal parts along ``axis``: opset 18 on asks for the count."""
        return self.op("Split", x, axis=axis, outputs=3, **({"num_outputs": 3} if self.opset >= 18 else {}))

    @property
    def epsilon(self):
        return self.attrs.get("epsilon", DEFAULT_EPSILON[self.node.op_type])

    def refuse(self, what):
        raise UnsupportedModelError(
            f"node {self.name!r} ({self.node.op_type}, {self.node.domain or 'ai.onnx'}): {what} is not supported"
        )


def add_optional(e, x, y):
    """x + y, or x where y is absent."""
    return e.op("Add", x, y) if y else x


def gelu(e, x, out):
    """GELU(x) = x·Φ(x), Φ(x) = (1 + erf(x/√2))/2, in the order torch exports it: a gate on x."""
    cdf = e.op("Add", e.op("Erf", e.op("Div", x, e.const(np.sqrt(2)))), e.const(1.0))
    return e.op("Mul", e.op("Mul", x, cdf), e.const(0.5), out=out)


def expand_bias_gelu(e):
    """BiasGelu(A, B) = GELU(A + B); com.microsoft Gelu(X) = GELU(X)."""
    gelu(e, add_optional(e, e.input(0), e.input(1)), e.output(0))


def expand_fast_gelu(e):
    """FastGelu(X, bias) = GELU's tanh form of X + bias: x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))/2."""
    x = add_optional(e, e.input(0), e.input(1))
    cubic = e.op("Mul", e.op("Pow", x, e.const(3.0)), e.const(GELU_TANH_CUBIC))
    inner = e.op("Tanh", e.op("Mul", e.op("Add", x, cubic), e.const(SQRT_2_OVER_PI)))
    e.op("Mul", e.op("Mul", x, e.op("Add", inner, e.const(1.0))), e.const(0.5), out=e.output(0))


def expand_quick_gelu(e):
    """QuickGelu(X) = x·sigmoid(alpha·x)."""
    x = e.input(0)
    gate = e.op("Sigmoid", e.op("Mul", x, e.const(e.attrs.get("alpha", 1.702))))
    e.op("Mul", x, gate, out=e.output(0))


def expand_bias_add(e):
    """BiasAdd(X, bias, skip) = X + bias + skip: a layer's bias, then the residual."""
    e.op("Add", e.op("Add", e.input(0), e.input(1)), e.input(2), out=e.output(0))


def scaled_by_deviation(e, x, gamma, out):
    """x / √(mean(x²) + ε) · γ over the last axis: a normalisation x/σ(x), then a fixed scale."""
    variance = e.along("ReduceMean", e.op("Pow", x, e.const(2.0)), [-1], keepdims=1)
    sigma = e.op("Sqrt", e.op("Add", variance, e.const(e.epsilon)))
    return e.op("Mul", e.op("Div", x, sigma), gamma, out=out)


def layer_normalization(e, x, gamma, beta, out):
    """LayerNormalization over the last axis; below opset 17, which lacks it, written out as
    TorchScript exports it there: centring, then ``scaled_by_deviation``, then + β."""
    if e.opset >= LAYER_NORMALIZATION_OPSET:
        return e.op("LayerNormalization", x, gamma, beta, out=out, axis=-1, epsilon=e.epsilon)
    centred = e.op("Sub", x, e.along("ReduceMean", x, [-1], keepdims=1))
    if not beta:
        return scaled_by_deviation(e, centred, gamma, out)
    return e.op("Add", scaled_by_deviation(e, centred, gamma, None), beta, out=out)


def normalized(e, x, gamma, beta, simplified):
    """LayerNormalization over the last axis, or its RMS form, into the fused node's output 0.
    The fused node's mean and inverse-deviation outputs (1, 2: for training) are refused."""
    if e.output(1) or e.output(2):
        e.refuse("the mean and inverse standard deviation outputs")
    if simplified:
        return scaled_by_deviation(e, x, gamma, e.output(0))
    return layer_normalization(e, x, gamma, beta, e.output(0))


def expand_skip_normalization(e, simplified):
    """Skip(Simplified)LayerNormalization(input, skip, γ, [β,] bias): the layer's bias, the
    residual, then the normalisation; output 3 is the sum before it."""
    bias = e.input(3 if simplified else 4)
    total = e.op("Add", add_optional(e, e.input(0), bias), e.input(1), out=e.output(3) or None)
    normalized(e, total, e.input(2), "" if simplified else e.input(3), simplified)


def expand_normalization(e, simplified):
    """SimplifiedLayerNormalization(X, γ) (RMSNorm), and LayerNormalization(X, γ, β) below opset 17
    (ORT's own, which its optimizer writes there), over the last axis."""
    if e.attrs.get("axis", -1) != -1:
        e.refuse(f"axis {e.attrs['axis']} (only -1)")
    normalized(e, e.input(0), e.input(1), e.input(2), simplified)


def expand_embed_normalization(e):
    """EmbedLayerNormalization(ids, segment ids, word, position and segment tables, γ, β, mask,
    position ids) = LayerNorm(word[ids] + segment[segment ids] + position[positions]), positions
    0…S−1 unless given; output 1 (mask_index) is each sample's count of mask ones, output 2 the
    sum before the normalisation. Ids that a Cast narrowed to int32 are read before it, so the
    word lookup reads the graph's ids (where plan.pick_input explains a text model)."""
    ids, segments, positions = e.input(0), e.input(1), e.input(8)
    total = e.op("Gather", e.input(2), e.facts.uncast(ids))
    if segments:
        total = e.op("Add", total, e.op("Gather", e.input(4), segments))
    if not positions:
        length = e.op("Gather", e.op("Shape", ids), e.const(1, np.int64))
        positions = e.along("Unsqueeze", e.op("Range", e.const(0, np.int64), length, e.const(1, np.int64)), [0])
    total = e.op("Add", total, e.op("Gather", e.input(3), positions), out=e.output(2) or None)
    layer_normalization(e, total, e.input(5), e.input(6), e.output(0))
    if e.output(1):
        if not e.input(7):
            e.refuse("mask_index without a mask input")
        e.along("ReduceSum", e.op("Cast", e.input(7), to=TensorProto.INT32), [1], out=e.output(1), keepdims=0)


def key_mask_bias(e, mask, keys):
    """The additive mask [N, 1, 1, L] for keys of length L: 0 where a key is attended, the node's
    mask_filter_value where not. ``mask`` is ORT's mask_index as [N] valid lengths (right padding)
    or a raw [N, L] mask of ones and zeros; other forms are refused."""
    rank = e.facts.rank(mask)
    if rank == 1:
        length = e.op("Gather", e.op("Shape", keys), e.const(1, np.int64))
        index = e.op("Range", e.const(0, np.int32), e.op("Cast", length, to=TensorProto.INT32), e.const(1, np.int32))
        attended = e.op(
            "Less",
            e.along("Unsqueeze", index, [0]),
            e.along("Unsqueeze", e.op("Cast", mask, to=TensorProto.INT32), [1]),
        )
    elif rank == 2:
        attended = e.op("Cast", mask, to=TensorProto.BOOL)
    else:
        e.refuse(f"a mask of rank {rank if rank is not None else 'unknown'} (supported: [N] lengths, a [N, L] mask)")
    # float16 models: exporters write float32's lowest (-3.4e38), which float16 rounds to -inf
    masked = max(e.attrs.get("mask_filter_value", -10000.0), float(np.finfo(e.dtype).min))
    bias = e.op("Where", attended, e.const(0.0), e.const(masked))
    return e.along("Unsqueeze", bias, [1, 2])


def attend(e, q, k, v, mask_bias, attention_bias):
    """Multi-head attention on [N, S, heads·d] projections into the fused node's output 0:
    softmax(q·kᵀ·scale + biases)·v per head, scale 1/√d unless the node sets one."""
    heads = e.attrs["num_heads"]

    def split_heads(t, perm):
        return e.op("Transpose", e.op("Reshape", t, e.const([0, 0, heads, -1], np.int64)), perm=perm)

    queries = split_heads(q, [0, 2, 1, 3])
    scores = e.op("MatMul", queries, split_heads(k, [0, 2, 3, 1]))
    if e.attrs.get("scale"):
        scores = e.op("Mul", scores, e.const(e.attrs["scale"]))
    else:
        head_size = e.op("Gather", e.op("Shape", queries), e.const(-1, np.int64))
        scores = e.op("Div", scores, e.op("Sqrt", e.op("Cast", head_size, to=e.float_type)))
    scores = add_optional(e, add_optional(e, scores, attention_bias), mask_bias)
    context = e.op("MatMul", e.op("Softmax", scores, axis=-1), split_heads(v, [0, 2, 1, 3]))
    e.op("Reshape", e.op("Transpose", context, perm=[0, 2, 1, 3]), e.const([0, 0, -1], np.int64), out=e.output(0))


def refuse_decoding(e, past_inputs, past_outputs):
    if e.attrs.get("unidirectional") or e.attrs.get("do_rotary"):
        e.refuse("causal (unidirectional) or rotary attention")
    if any(e.input(k) for k in past_inputs) or any(e.output(k) for k in past_outputs):
        e.refuse("a key/value cache (past and present states)")


def expand_attention(e):
    """Attention(x, W, bias, mask_index, past, attention_bias): the q, k and v projections
    x·W + bias in one MatMul, split (by qkv_hidden_sizes, else in three), then ``attend``."""
    refuse_decoding(e, past_inputs=(4, 6), past_outputs=(1,))
    projections = (
        e.op("Add", e.op("MatMul", e.input(0), e.input(1)), e.input(2))
        if e.input(2)
        else e.op("MatMul", e.input(0), e.input(1))
    )
    sizes = e.attrs.get("qkv_hidden_sizes")
    split = e.along("Split", projections, sizes, axis=-1, outputs=3) if sizes else e.thirds(projections, -1)
    mask = key_mask_bias(e, e.input(3), split[1]) if e.input(3) else ""
    attend(e, *split, mask, e.input(5))


def expand_multi_head_attention(e):
    """MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias) with separate
    [N, S, D] query, key and value; bias (q, k and v's, concatenated) is added to each."""
    refuse_decoding(e, past_inputs=(6, 7, 8, 9), past_outputs=(1, 2))
    if not e.input(1) or not e.input(2):
        e.refuse("packed query, key and value")
    q, k, v = e.input(0), e.input(1), e.input(2)
    if e.input(3):
        q, k, v = (e.op("Add", t, b) for t, b in zip((q, k, v), e.thirds(e.input(3), 0)))
    mask = key_mask_bias(e, e.input(4), k) if e.input(4) else ""
    attend(e, q, k, v, mask, e.input(5))


EXPANSIONS = {
    "Attention": expand_attention,
    "MultiHeadAttention": expand_multi_head_attention,
    "EmbedLayerNormalization": expand_embed_normalization,
    "SkipLayerNormalization": lambda e: expand_skip_normalization(e, simplified=False),
    "SkipSimplifiedLayerNormalization": lambda e: expand_skip_normalization(e, simplified=True),
    "SimplifiedLayerNormalization": lambda e: expand_normalization(e, simplified=True),
    "LayerNormalization": lambda e: expand_normalization(e, simplified=False),
    "BiasGelu": expand_bias_gelu,
    "Gelu": expand_bias_gelu,
    "FastGelu": expand_fast_gelu,
    "QuickGelu": expand_quick_gelu,
    "BiasAdd": expand_bias_add,
}
# ORT registers these in the standard domain, below the opset given (where one is): fused ops there
STANDARD_DOMAIN_FUSED = {"SimplifiedLayerNormalization": None, "LayerNormalization": LAYER_NORMALIZATION_OPSET}


def is_fused(node, opset):
    if node.op_type not in EXPANSIONS:
        return False
    if node.domain in ("", "ai.onnx") and node.op_type in STANDARD_DOMAIN_FUSED:
        below = STANDARD_DOMAIN_FUSED[node.op_type]
        return below is None or opset < below
    return node.domain == MICROSOFT


class ModelFacts:
    """What the expansions read of the rest of the model: the tensors something reads, and ranks
    known before shape inference (which does not know the fused ops): declared ones, and those
    that follow through the ops ORT's optimizer puts before an attention mask."""

    def __init__(self, graph):
        typed = [
            v for v in list(graph.input) + list(graph.value_info) + list(graph.output) if v.type.HasField("tensor_type")
        ]
        self.declared = {
            v.name: len(v.type.tensor_type.shape.dim) for v in typed if v.type.tensor_type.HasField("shape")
        }
        self.declared.update({t.name: len(t.dims) for t in graph.initializer})
        self.types = {v.name: v.type.tensor_type.elem_type for v in typed}
        self.types.update({t.name: t.data_type for t in graph.initializer})
        self.integer = {name for name, elem_type in self.types.items() if _is_integer(elem_type)}
        self.producer = {name: node for node in graph.node for name in node.output}
        self.initializers = {t.name: t for t in graph.initializer}  # read when needed: weights stay unconverted
        self.read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
        self.float_types = {}  # first output of a node -> its float type, as float_type_of found it

    def rank(self, name):
        if name in self.declared:
            return self.declared[name]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "EmbedLayerNormalization" and name == node.output[1]:
            return 1
        if node.op_type in ("Cast", "Not", "Identity"):
            return self.rank(node.input[0])
        if node.op_type in ("ReduceSum", "ReduceMax", "ReduceMin"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            rank = self.rank(node.input[0])
            if attrs.get("keepdims", 1) or rank is None:
                return rank
            axes = node.input[1] if len(node.input) > 1 else None
            axes = numpy_helper.to_array(self.initializers[axes]) if axes in self.initializers else attrs.get("axes")
            return None if axes is None else rank - len(np.atleast_1d(axes))
        return None

    def float_type_of(self, node):
        """The float element type of ``node``'s values, where it can be told before shape inference:
        that of its first input of a declared float type, else of the first one whose producer's
        can be told (a Cast's is its target type, a Constant's its value's)."""
        key = node.output[0]
        if key not in self.float_types:
            self.float_types[key] = None  # a cycle, which the checker refuses later, ends here
            self.float_types[key] = self._float_type_of(node)
        return self.float_types[key]

    def _float_type_of(self, node):
        attrs = {a.name: a for a in node.attribute}
        if node.op_type in ("Cast", "Constant"):
            told = attrs["to"].i if node.op_type == "Cast" else attrs["value"].t.data_type if "value" in attrs else None
            return told if told in FLOAT_TYPES else None
        known = [self.types.get(name) for name in node.input]
        declared = next((t for t in known if t in FLOAT_TYPES), None)
        producers = (self.producer[name] for name, t in zip(node.input, known) if t is None and name in self.producer)
        return declared or next(filter(None, map(self.float_type_of, producers)), None)

    def uncast(self, name):
        """The tensor before a Cast between integer types (ids narrowed to int32), else ``name``."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Cast":
            return name
        to = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
        return node.input[0] if node.input[0] in self.integer and _is_integer(to) else name


FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _is_integer(elem_type):
    return elem_type != TensorProto.UNDEFINED and np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).kind in "iu"


def expand_fused_ops(proto, label):
    """The model with every fused op of EXPANSIONS replaced by its standard ops (module docstring);
    other models are returned as they are."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if not any(is_fused(node, opset) for node in proto.graph.node):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    facts = ModelFacts(copy.graph)
    nodes = []
    for node in copy.graph.node:
        if not is_fused(node, opset):
            nodes.append(node)
            continue
        expansion = Expansion(node, opset, facts)
        try:
            EXPANSIONS[node.op_type](expansion)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{label}: {e}") from None
        except (KeyError, IndexError) as e:  # a required attribute or input missing: the checker never saw these ops
            raise ModelLoadError(f"{label}: node {expansion.name!r} ({node.op_type}) lacks its {e}") from None
        nodes.extend(expansion.nodes)
        copy.graph.initializer.extend(expansion.constants)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy

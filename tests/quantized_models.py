"""Quantized ONNX models from ONNX Runtime's own quantizer, and the float networks they stand for.

``quantize(path, form)`` runs ``onnxruntime.quantization`` the way its documentation asks:
``quant_pre_process`` (shape inference and ORT's optimizer, which folds BatchNorm into the
convolutions), then ``quantize_static`` calibrated on a few seeded inputs.

``FloatNetwork`` is the reference the quantized explainers are held to: a torch module read from
the quantized file itself, with its dequantized weights, each quantized op as its float op, and
each activation rounding (a QuantizeLinear or DynamicQuantizeLinear, or a QOperator op's
requantization) as a ``Rounding`` module, which Zennit's Pass rule passes relevance through. It
is written here from the ONNX operator definitions, independently of lrp_onnx.
"""

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.layer import Sum
from zennit.rules import AlphaBeta, Epsilon, Pass
from zennit.types import Convolution

FORMS = ("qdq", "qoperator", "dynamic")


class Calibration:
    """``onnxruntime.quantization.CalibrationDataReader``: ``count`` seeded standard-normal inputs."""

    def __init__(self, name, shape, count=8, seed=0):
        rng = np.random.default_rng(seed)
        self.batches = iter([{name: rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self.batches, None)


def quantize(path, form, out_path, input_name="x", shape=(3, 16, 16), **preprocess):
    """``path`` quantized: statically, per channel, "qdq" with int8 activations and weights (the
    quantizer's defaults), "qoperator" with uint8 activations (the x86 QOperator layout); or
    "dynamic" (quantize_dynamic's defaults: uint8 activations quantized at run time, int8 weights).
    ``preprocess``: options of ``quant_pre_process`` (skip_symbolic_shape=True, say)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = str(out_path) + ".prepared.onnx"
    quant_pre_process(str(path), prepared, **preprocess)
    if form == "dynamic":
        quantize_dynamic(prepared, str(out_path))
        return str(out_path)
    activations = QuantType.QInt8 if form == "qdq" else QuantType.QUInt8
    quantize_static(prepared, str(out_path), Calibration(input_name, shape),
                    quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
                    per_channel=True, activation_type=activations, weight_type=QuantType.QInt8)
    return str(out_path)


class ResidualCNN(nn.Module):
    """Conv+BN+ReLU, max pooling, a residual block (whose Add becomes QLinearAdd), a strided conv,
    global average pooling and a dense head: every op a quantized CNN is made of."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        stem = self.stem(x)
        return self.head(self.down(stem + self.block(stem)))


def residual_cnn(path, seed=3):
    """A random-init ResidualCNN (random BatchNorm statistics) exported by torch.onnx, dynamic batch."""
    import warnings
    torch.manual_seed(seed)
    model = ResidualCNN().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return str(path)


# --- the float network a quantized file stands for ---------------------------------------------------

def dequantize(q, scale, zero_point, axis):
    """DequantizeLinear: (q − zero_point)·scale, the scale per channel along ``axis`` if 1-D."""
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero_point if zero_point is not None else 0)
    shape = [-1 if i == axis % q.ndim else 1 for i in range(q.ndim)] if scale.ndim == 1 else scale.shape
    return (q.astype(np.int32) - zero.astype(np.int32).reshape(shape)).astype(np.float32) * scale.reshape(shape)


class Rounding(nn.Module):
    """QuantizeLinear then DequantizeLinear on an activation: (clip(round(x / s) + z) − z)·s, rounding
    half to even and saturating to the zero point's type.

    With ``observed`` (the dequantized values a run of the quantized model gave this tensor), those
    are the output instead: in a deep network a float computation that rounds its sums in another
    order lands on the other side of a rounding step now and then, and the flips compound layer
    by layer, so a reference must hold the activations the model had to be comparable."""

    def __init__(self, scale, zero_point, name, observed=None):
        super().__init__()
        info = np.iinfo(zero_point.dtype)
        self.low, self.high, self.name, self.observed = float(info.min), float(info.max), name, observed
        self.register_buffer("scale", torch.tensor(np.float32(scale)))
        self.register_buffer("zero", torch.tensor(float(zero_point)))

    def forward(self, x):
        if self.observed is not None and self.name in self.observed:
            return x + (torch.as_tensor(self.observed[self.name]) - x).detach()
        q = torch.clamp(torch.round(x / self.scale) + self.zero, self.low, self.high)
        return (q - self.zero) * self.scale


class DynamicRounding(Rounding):
    """DynamicQuantizeLinear then DequantizeLinear: uint8 with the scale and zero point of the whole
    tensor's range, extended to hold 0 (ONNX's definition); or the observed values, as Rounding."""

    def __init__(self, name, observed=None):
        super().__init__(np.float32(1), np.uint8(0), name, observed)

    def forward(self, x):
        if self.observed is not None and self.name in self.observed:
            return x + (torch.as_tensor(self.observed[self.name]) - x).detach()
        low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
        scale = (high - low) / 255
        zero = torch.clamp(torch.round(-low / scale), 0, 255)
        return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


class Residual(nn.Module):
    """a + b through zennit's Sum (which its Norm rule splits), as Zennit's ResNet canonizer does."""

    def __init__(self):
        super().__init__()
        self.sum = Sum()

    def forward(self, a, b):
        return self.sum(torch.stack([a, b], dim=-1))


class FloatNetwork(nn.Module):
    """The float network of a quantized (QDQ or QOperator) or float ONNX CNN, node by node: 2-D
    images or 3-D videos, every tensor before the Flatten of the input's rank."""

    def __init__(self, path, observed=None):
        super().__init__()
        self.observed = observed
        self.retain, self.retained = set(), {}  # tensors whose relevance zennit_relevance_at reads
        model = onnx.load(path)
        graph = model.graph
        self.fixed = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.spatial = len(graph.input[0].type.tensor_type.shape.dim) - 2  # nn.Conv2d or nn.Conv3d, ...
        self.layers = nn.ModuleDict()
        self.steps = []  # (module key or None, function, input names, output name)
        # dynamic quantization: the weight part of each scales tensor, the integer products waiting
        # for their scale Mul, and the layers whose bias Add is still to come
        self.weight_scales, self.integer, self.biasable, self.input_scales = {}, {}, {}, set()
        for node in graph.node:
            self._add(node)

    def _value(self, name):
        return self.fixed.get(name) if name else None

    def _dequantized(self, node, triple, axis):
        return dequantize(*[self._value(node.input[i]) if i < len(node.input) else None for i in triple], axis=axis)

    def _spatial_module(self, kind, *args, **kwargs):
        """torch's ``kind`` module for the network's spatial rank: nn.Conv2d, nn.MaxPool3d..."""
        return getattr(nn, f"{kind}{self.spatial}d")(*args, **kwargs)

    def _pads(self, attrs):
        """The leading pads of ONNX's [begin..., end...] (the exporters pad symmetrically)."""
        return attrs.get("pads", [0] * 2 * self.spatial)[:self.spatial]

    def _module(self, node, module):
        key = f"m{len(self.layers)}"
        self.layers[key] = module
        return key

    def _add(self, node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op, inputs, output = node.op_type, list(node.input), node.output[0]
        if op == "DequantizeLinear" and inputs[0] in self.fixed:  # a quantized weight
            self.fixed[output] = dequantize(*[self._value(i) for i in inputs] + [None] * (3 - len(inputs)),
                                            axis=attrs.get("axis", 1))
            return
        if op == "DequantizeLinear":  # activations are held dequantized already
            self.steps.append((None, lambda x: x, inputs[:1], output))
            return
        if op == "QuantizeLinear":
            key = self._module(node, Rounding(self.fixed[inputs[1]], self.fixed[inputs[2]], output, self.observed))
            self.steps.append((key, None, inputs[:1], output))
            return
        if op == "Reshape" and all(i in self.fixed for i in inputs):  # a bias reshaped to broadcast
            self.fixed[output] = self.fixed[inputs[0]].reshape(self.fixed[inputs[1]])
            return
        if self._add_dynamic(node, op, inputs, output, attrs):
            return
        rounding = None
        if op.startswith("QLinear") or op == "QGemm":
            op, inputs, rounding = self._float_form(node, op, inputs, attrs)
        if op == "Conv":
            w, b = self.fixed[inputs[1]], self.fixed.get(inputs[2]) if len(inputs) > 2 else None
            conv = self._spatial_module("Conv", w.shape[1] * attrs.get("group", 1), w.shape[0], w.shape[2:],
                                        stride=attrs.get("strides", 1), padding=self._pads(attrs),
                                        dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1),
                                        bias=b is not None)
            self._set(conv, w, b)
            module = conv
        elif op == "Gemm":
            w, b = self.fixed[inputs[1]], self.fixed.get(inputs[2]) if len(inputs) > 2 else None
            w = w if attrs.get("transB", 0) else w.T
            linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            self._set(linear, w * attrs.get("alpha", 1.0), None if b is None else b * attrs.get("beta", 1.0))
            module = linear
        elif op == "Add":
            module = Residual()
        elif op == "Relu":
            module = nn.ReLU()
        elif op == "MaxPool":
            module = self._spatial_module("MaxPool", attrs["kernel_shape"], attrs.get("strides", 1), self._pads(attrs))
        elif op == "GlobalAveragePool":
            module = self._spatial_module("AdaptiveAvgPool", 1)
        elif op == "Flatten":
            module = nn.Flatten()
        else:
            raise NotImplementedError(f"FloatNetwork has no {op}")
        data = [i for i in inputs if i not in self.fixed and i]
        key = self._module(node, module)
        if rounding is None:
            self.steps.append((key, None, data, output))
        else:
            inner = f"{output}/float"
            self.steps.append((key, None, data, inner))
            self.steps.append((self._module(node, rounding), None, [inner], output))

    def _add_dynamic(self, node, op, inputs, output, attrs):
        """Dynamic quantization's patterns (True where ``node`` was one): DynamicQuantizeLinear is a
        rounding; ConvInteger or MatMulInteger, its Cast and its Mul by (input scale · weight scale)
        are the float layer with weights (w − w_zero)·w_scale; a constant Add after it is its bias."""
        if op == "DynamicQuantizeLinear":
            self.steps.append((self._module(node, DynamicRounding(output, self.observed)), None, inputs[:1], output))
            self.input_scales.add(node.output[1])
            return True
        if op == "Mul" and any(i in self.input_scales for i in inputs):  # the input's scale times the weight's
            self.weight_scales[output] = next(self.fixed[i] for i in inputs if i in self.fixed)
            return True
        if op in ("ConvInteger", "MatMulInteger"):
            zero = self._value(inputs[3]) if len(inputs) > 3 else None
            self.integer[output] = (op, inputs[0], self.fixed[inputs[1]], zero, attrs)
            return True
        if op == "Cast" and inputs[0] in self.integer:
            self.integer[output] = self.integer[inputs[0]]
            return True
        if op == "Mul" and any(i in self.integer for i in inputs):
            product = next(i for i in inputs if i in self.integer)
            kind, data, w_q, w_zero, layer_attrs = self.integer[product]
            w_scale = self.weight_scales[next(i for i in inputs if i != product)]
            axis = 0 if kind == "ConvInteger" else 1
            w = dequantize(w_q, np.asarray(w_scale).reshape(-1), None if w_zero is None else
                           np.asarray(w_zero).reshape(-1), axis=axis)
            if kind == "ConvInteger":
                layer = self._spatial_module("Conv", w.shape[1], w.shape[0], w.shape[2:],
                                             stride=layer_attrs.get("strides", 1), padding=self._pads(layer_attrs),
                                             bias=True)
            else:
                w = w.T
                layer = nn.Linear(w.shape[1], w.shape[0], bias=True)
            self._set(layer, w, np.zeros(w.shape[0], np.float32))
            self.steps.append((self._module(node, layer), None, [data], output))
            self.biasable[output] = layer
            return True
        if op == "Add" and any(i in self.biasable for i in inputs) and any(i in self.fixed for i in inputs):
            layer = self.biasable[next(i for i in inputs if i in self.biasable)]
            with torch.no_grad():
                layer.bias.copy_(torch.tensor(np.asarray(self.fixed[next(i for i in inputs if i in self.fixed)],
                                                         np.float32).reshape(-1)))
            self.steps.append((None, lambda x: x, [next(i for i in inputs if i in self.biasable)], output))
            return True
        return False

    def _float_form(self, node, op, inputs, attrs):
        """(float op, its inputs, the Rounding of its output) of a QOperator node; its weights and
        bias are dequantized into ``fixed`` under new names."""
        name = node.output[0]

        def rounding(at):  # the requantization by the scale and zero point at inputs[at], inputs[at + 1]
            return Rounding(self.fixed[inputs[at]], self.fixed[inputs[at + 1]], name, self.observed)
        if op == "QLinearConv":
            self.fixed[f"{name}/w"] = self._dequantized(node, (3, 4, 5), axis=0)
            float_inputs = [inputs[0], f"{name}/w"]
            if len(inputs) > 8 and inputs[8]:
                scale = np.float32(self.fixed[inputs[1]]) * self.fixed[inputs[4]].astype(np.float32)
                self.fixed[f"{name}/b"] = dequantize(self.fixed[inputs[8]], scale.reshape(-1), None, axis=0)
                float_inputs.append(f"{name}/b")
            return "Conv", float_inputs, rounding(6)
        if op == "QGemm":
            self.fixed[f"{name}/w"] = self._dequantized(node, (3, 4, 5), axis=0 if attrs.get("transB", 0) else 1)
            float_inputs = [inputs[0], f"{name}/w"]
            if len(inputs) > 6 and inputs[6]:
                scale = np.float32(self.fixed[inputs[1]]) * self.fixed[inputs[4]].astype(np.float32)
                self.fixed[f"{name}/b"] = dequantize(self.fixed[inputs[6]], scale.reshape(-1), None, axis=0)
                float_inputs.append(f"{name}/b")
            attrs["beta"] = attrs.get("alpha", 1.0)  # alpha·(A·B + C)
            return "Gemm", float_inputs, rounding(7) if len(inputs) > 7 else None
        if op == "QLinearAdd":
            return "Add", [inputs[0], inputs[3]], rounding(6)
        if op == "QLinearGlobalAveragePool":
            return "GlobalAveragePool", inputs[:1], rounding(3)
        raise NotImplementedError(f"FloatNetwork has no {op}")

    @staticmethod
    def _set(layer, weight, bias):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(np.array(weight)))
            if bias is not None:
                layer.bias.copy_(torch.tensor(np.array(bias)))

    def forward(self, x):
        values = {self.input_name: x}
        for key, function, inputs, output in self.steps:
            call = self.layers[key] if key is not None else function
            values[output] = call(*[values[i] for i in inputs])
            if output in self.retain and values[output].requires_grad:  # not the no_grad probe of the classes
                values[output].retain_grad()
                self.retained[output] = values[output]
        return values[self.output_name]


def observed_activations(path, x):
    """{name: dequantized value} of every quantized activation of the model at ``path`` on input x,
    as ONNX Runtime computes them with its graph optimisations off (the kernels ONNX defines; an
    explainer session with optimisations off computes the same)."""
    import onnxruntime as ort
    model = onnx.load(path)
    fixed = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = {}  # tensor -> (scale, zero point) names
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            quantized[node.output[0]] = node.input[1:3]
        elif node.op_type in ("QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool"):
            at = {"QLinearConv": 6, "QLinearAdd": 6, "QGemm": 7, "QLinearGlobalAveragePool": 3}[node.op_type]
            if len(node.input) > at:
                quantized[node.output[0]] = node.input[at:at + 2]
        elif node.op_type == "DynamicQuantizeLinear":  # its scale and zero point are outputs of the run
            quantized[node.output[0]] = node.output[1:3]
    names = [n for n in quantized if n not in {o.name for o in model.graph.output}]
    parameters = sorted({p for n in names for p in quantized[n] if p not in fixed} - set(names))
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names + parameters)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        names + parameters, {model.graph.input[0].name: x})
    known = dict(fixed, **dict(zip(names + parameters, values)))
    return {n: dequantize(known[n], known[quantized[n][0]], known[quantized[n][1]], axis=1) for n in names}


def zennit_composite(composite, stabilizer=1e-6, epsilon=1e-6):
    """lrp-onnx's ``composite`` (alpha-beta or epsilon) as Zennit rules for a FloatNetwork: the rule
    on convolutions and dense layers, Zennit's base map (Pass on activations, Norm on sums and
    average pooling), and Pass on the roundings."""
    rule = {"alpha-beta": AlphaBeta(2.0, 1.0, stabilizer), "epsilon": Epsilon(epsilon)}[composite]
    return LayerMapComposite(layer_map_base(stabilizer) + [(Rounding, Pass()), (Convolution, rule), (nn.Linear, rule)])


def zennit_relevance(network, x, targets, composite):
    """Zennit's relevance of ``network``, seeded with logit ⊙ onehot(target) at its output."""
    from zennit.attribution import Gradient
    x = torch.as_tensor(x)
    with torch.no_grad():
        classes = network(x).shape[1]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(targets), classes).float()
    with Gradient(model=network, composite=composite) as attributor:
        out, relevance = attributor(x, lambda out: out * onehot)
    return out.detach().numpy(), relevance.detach().numpy()


def zennit_relevance_at(network, x, targets, composite, names):
    """Zennit's relevance at the FloatNetwork's tensors ``names``: the gradient its rules leave there."""
    network.retain = set(names)
    zennit_relevance(network, x, targets, composite)
    return {name: network.retained[name].grad.numpy() for name in names}


# --- weight-only quantization (MatMulNBits) ----------------------------------------------------------

class TokenMLP(nn.Module):
    """Per-token dense layers (MatMul + Add on [N, T, D], what ONNX Runtime's MatMulNBits quantizer
    takes), an average over the tokens (Zennit's Norm on the pooling) and a dense head."""

    def __init__(self, features=64, classes=5):
        super().__init__()
        self.first, self.second = nn.Linear(features, 48), nn.Linear(48, 32)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        h = torch.relu(self.second(torch.relu(self.first(x))))
        return self.head(self.pool(h.transpose(1, 2)).squeeze(-1))


def nbits_quantized(path, out_path, bits=4, block_size=16):
    """``path`` with its MatMul weights quantized by ONNX Runtime's MatMulNBitsQuantizer (asymmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=bits, block_size=block_size, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path))
    return str(out_path)


def nbits_dequantized(node, initializers):
    """MatMulNBits' [K, N] weight, from the contrib operator's definition, one value at a time:
    byte k // 2 of block j holds value 2i in its low four bits and 2i + 1 in its high ones."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    assert bits == 4
    packed = initializers[node.input[1]].reshape(n, -1, block // 2)
    scales = initializers[node.input[2]].reshape(n, -1)
    zeros = initializers[node.input[3]].reshape(n, -1) if len(node.input) > 3 else None
    weight = np.zeros((k, n), np.float32)
    for column in range(n):
        for row in range(k):
            j, i = divmod(row, block)
            byte = int(packed[column, j, i // 2])
            q = byte & 15 if i % 2 == 0 else byte >> 4
            zero = 8 if zeros is None else (int(zeros[column, j // 2]) >> (4 * (j % 2))) & 15
            weight[row, column] = np.float32(q - zero) * scales[column, j]
    return weight

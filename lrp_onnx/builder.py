"""The one place that emits ONNX nodes: unique names, shared constants, shared sub-expressions.

Every node the converter adds is named ``lrp/<forward node>/<op>_<k>``, so that error messages,
``inspect`` and profilers can point back at the layer it belongs to.
"""

from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, gs.Constant):
        value = value.values
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    return value


class Builder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._taken = {t.name for t in graph.tensors().values()} | {n.name for n in graph.nodes}
        self._scope = "lrp"
        self._counter = 0
        # Pure ops on the same inputs are emitted once: W+ = Relu(W) is shared by every term that needs it.
        self._memo: dict[tuple, Any] = {}  # key -> a graphsurgeon tensor, or a tuple of them

    @contextmanager
    def scope(self, name):
        outer = self._scope
        self._scope = f"lrp/{name}"
        try:
            yield
        finally:
            self._scope = outer

    def name(self, stem):
        """A fresh, unique name under the current scope."""
        while True:
            self._counter += 1
            name = f"{self._scope}/{stem}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type, *inputs, outputs=1, **attrs):
        """Emit one node; returns its output tensor, or a tuple when ``outputs`` > 1. Trailing
        absent inputs (None) are left out, not written as empty names: some runtimes (OpenVINO)
        cannot compile an empty optional input such as Gemm's C."""
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        inputs = [self.const(i) if not isinstance(i, gs.Tensor) and i is not None else i for i in inputs]
        key = (
            op_type,
            tuple(i.name if i is not None else "" for i in inputs),
            outputs,
            tuple(sorted((k, _freeze(v)) for k, v in attrs.items())),
        )
        if key not in self._memo:
            name = self.name(op_type)
            outs = [gs.Variable(f"{name}:{k}") for k in range(outputs)]
            ins = [i if i is not None else gs.Variable.empty() for i in inputs]
            self.graph.nodes.append(gs.Node(op_type, name=name, attrs=attrs, inputs=ins, outputs=outs))
            self._memo[key] = outs[0] if outputs == 1 else tuple(outs)
        return self._memo[key]

    def const(self, value, dtype=np.float32):
        array = np.asarray(value, dtype=dtype)
        key = ("const", _freeze(array))
        if key not in self._memo:
            self._memo[key] = gs.Constant(self.name("const"), array)
        return self._memo[key]

    def ints(self, values):
        return self.const(values, np.int64)

    # --- arithmetic helpers, each one ONNX op unless said otherwise -------------------------------

    def add(self, a, b):
        return self.op("Add", a, b)

    def sub(self, a, b):
        return self.op("Sub", a, b)

    def mul(self, a, b):
        return self.op("Mul", a, b)

    def div(self, a, b):
        return self.op("Div", a, b)

    def neg(self, a):
        return self.op("Neg", a)

    def positive(self, a):
        """a⁺ = max(a, 0)"""
        return self.op("Relu", a)

    def negative(self, a):
        """a⁻ = min(a, 0)"""
        return self.op("Min", a, self.const(0.0))

    def total(self, terms):
        """Σ terms, with one Sum node for several."""
        terms = [t for t in terms if t is not None]
        if len(terms) == 1:
            return terms[0]
        return self.op("Sum", *terms)

    def stabilize(self, z, epsilon):
        """z + ε·sign(z) with sign(0) = +1. ONNX's Sign(0) is 0, so build it from a comparison."""
        signed_epsilon = self.op(
            "Where", self.op("GreaterOrEqual", z, self.const(0.0)), self.const(epsilon), self.const(-epsilon)
        )
        return self.add(z, signed_epsilon)

    def as_float(self, t):
        """t as float32 where it is an integer tensor (a quantized activation, raw pixels): every
        8- and 16-bit integer is exact in float32, so comparisons come out as on the integers."""
        if t.dtype is None or np.dtype(t.dtype).kind not in "iu":
            return t
        cast = self.op("Cast", t, to=1)
        cast.dtype, cast.shape = np.float32, t.shape  # the propagators read the input's static sizes
        return cast

    def shape(self, t):
        return self.op("Shape", t)

    def unbroadcast(self, r, like, out):
        """Sum r (shaped like ``out``) over the axes that broadcasting expanded ``like`` along, back to
        ``like``'s shape."""
        if like.shape is None or out.shape is None or list(like.shape) == list(out.shape):
            return r
        leading = len(out.shape) - len(like.shape)
        padded = [1] * leading + list(like.shape)
        axes = [i for i, (d, o) in enumerate(zip(padded, out.shape)) if d == 1 and o != 1]
        summed = self.op("ReduceSum", r, self.ints(axes), keepdims=1) if axes else r
        # the axes broadcasting prepended are now of size 1: drop them (a Squeeze keeps every other size)
        return self.op("Squeeze", summed, self.ints(list(range(leading)))) if leading else summed

    def reshape_like(self, r, like, source=None):
        """r with ``like``'s shape; ``source`` is the tensor r is shaped like, where known."""
        return self.op("Reshape", r, self.target_shape(like, source, keep=0))

    def target_shape(self, like, source=None, keep=0):
        """``like``'s shape as the target of a Reshape (keep=0, which copies the input's size) or an
        Expand (keep=1, which keeps it): a constant where ``like``'s sizes are static but the first,
        and ``source`` (the input's shape) has the same first size; Shape(like) otherwise. A
        constant lets shape inference keep the symbolic batch size, which ONNX Runtime's blocked
        NCHWc layout needs to prove that two tensors match before it multiplies them in that layout
        (benchmarks/LEVERS.md)."""
        shape = like.shape
        if shape is not None and all(isinstance(d, int) for d in shape):
            return self.ints(list(shape))
        if (
            shape
            and source is not None
            and source.shape
            and shape[0] is not None
            and shape[0] == source.shape[0]
            and all(isinstance(d, int) for d in shape[1:])
        ):
            return self.ints([keep] + list(shape[1:]))
        return self.shape(like)

    def fill(self, shape, value):
        """A float tensor of the given (run-time) shape, every element ``value``."""
        return self.op("ConstantOfShape", shape, value=gs.Constant(f"fill_{value}", np.array([value], np.float32)))

    def fill_like(self, like, value):
        return self.fill(self.shape(like), value)

    def ones_per_sample(self, like):
        """Ones shaped like one sample of ``like`` ([1, …], which broadcasts over the batch) where its
        other sizes are static: what is computed from them alone (flat's z', an average's divisor)
        is then constant and folded by the runtime at load. Shaped like ``like`` otherwise."""
        shape = like.shape
        if shape and all(isinstance(d, int) for d in shape[1:]):
            return self.fill(self.ints([1] + list(shape[1:])), 1.0)
        return self.fill_like(like, 1.0)

    def zeros_like(self, like):
        return self.fill(self.shape(like), 0.0)

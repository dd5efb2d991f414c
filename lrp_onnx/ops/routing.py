"""Shape and routing ops: relevance is moved, never mixed. Each returns R in its input's shape."""

import numpy as np

from ..errors import SHAPE_HINT
from ..graph import is_constant
from ..registry import routing


def _inputs_after_first(unit):
    return [None] * (len(unit.inputs) - 1)


@routing("Identity", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
def unchanged(b, unit, relevance_out):
    """The same values, or the same values rounded (a quantizer, a Cast between float types): R
    passes one to one, as through Zennit's Pass rule. A quantized tensor's relevance is its value's."""
    return [relevance_out[0]] + _inputs_after_first(unit)


@routing("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def rearranged(b, unit, relevance_out):
    """Same elements, new shape: give R back the input's shape."""
    return [b.reshape_like(relevance_out[0], unit.inputs[0], unit.outputs[0])] + _inputs_after_first(unit)


def _check_expand(unit):
    if unit.inputs[0].shape is None or unit.outputs[0].shape is None:
        return f"Expand needs known input and output shapes (to find the broadcast axes); {SHAPE_HINT}"
    return None


@routing("Expand", check=_check_expand)
def expanded(b, unit, relevance_out):
    """y = x broadcast to a shape: R_x = R summed over the axes x was broadcast along."""
    return [b.unbroadcast(relevance_out[0], unit.inputs[0], unit.outputs[0]), None]


@routing("Transpose")
def transposed(b, unit, relevance_out):
    perm = unit.head.attrs.get("perm")
    if perm is None:
        perm = list(reversed(range(len(unit.inputs[0].shape))))
    return [b.op("Transpose", relevance_out[0], perm=[int(i) for i in np.argsort(perm)])]


def _axis(unit):
    return unit.head.attrs.get("axis", 0)


@routing("Concat")
def concatenated(b, unit, relevance_out):
    """Split R along the axis into the inputs' sizes (read at run time, so dynamic sizes work)."""
    axis = _axis(unit)
    sizes = b.op("Concat", *[b.op("Gather", b.shape(x), b.ints([axis])) for x in unit.inputs], axis=0)
    pieces = b.op("Split", relevance_out[0], sizes, axis=axis, outputs=len(unit.inputs))
    pieces = pieces if isinstance(pieces, tuple) else (pieces,)
    return [piece if rel else None for piece, rel in zip(pieces, unit.relevant)]


@routing("Split")
def split(b, unit, relevance_out):
    """Concatenate the pieces' relevance, zeros for pieces that got none."""
    pieces = [r if r is not None else b.zeros_like(y) for r, y in zip(relevance_out, unit.outputs)]
    return [b.op("Concat", *pieces, axis=_axis(unit))] + _inputs_after_first(unit)


def _static_dims(t, axes):
    return t.shape is not None and all(isinstance(t.shape[a], int) for a in axes)


def _slice_params(unit):
    x = unit.inputs[0]
    starts, ends = (np.asarray(unit.inputs[i].values).reshape(-1) for i in (1, 2))
    rank = len(x.shape)
    axes = (
        np.asarray(unit.inputs[3].values).reshape(-1)
        if len(unit.inputs) > 3 and unit.inputs[3].name
        else np.arange(len(starts))
    )
    steps = (
        np.asarray(unit.inputs[4].values).reshape(-1)
        if len(unit.inputs) > 4 and unit.inputs[4].name
        else np.ones(len(starts), np.int64)
    )
    return starts, ends, [int(a) % rank for a in axes], steps


def _check_slice(unit):
    if not all(is_constant(t) for t in unit.inputs[1:] if t.name):
        return "Slice starts/ends/axes/steps must be constant"
    if unit.inputs[0].shape is None or not _static_dims(unit.inputs[0], _slice_params(unit)[2]):
        return f"Slice needs static sizes on the sliced axes; {SHAPE_HINT}"
    return None


@routing("Slice", check=_check_slice)
def sliced(b, unit, relevance_out):
    """Put R back where the slice came from: zero-pad by what was cut on each side of a step-1
    axis; along a strided one (Swin's patch merging, x[:, 0::2]), R onto the indices it read."""
    x = unit.inputs[0]
    rank = len(x.shape)
    r, pads = relevance_out[0], [0] * (2 * rank)
    for start, end, axis, step in zip(*_slice_params(unit)):
        n = x.shape[axis]
        indices = range(*slice(int(start), int(end), int(step)).indices(n))  # ONNX clamps as Python does
        if step == 1:
            pads[axis], pads[axis + rank] = indices.start, n - max(indices.stop, indices.start)
        else:
            r = _onto_axis(b, r, axis, np.array(indices, np.int64), n, rank)
    return [b.op("Pad", r, b.ints(pads)) if any(pads) else r] + _inputs_after_first(unit)


def _onto_axis(b, r, axis, indices, n, rank):
    """R read at ``indices`` of an axis of static size n, put back onto that axis: contracted with
    the one-hot matrix H[l, d] = (indices[l] == d), so repeated indices add."""
    onehot = (indices.reshape(-1, 1) % n == np.arange(n)).astype(np.float32)
    to_last = [i for i in range(rank) if i != axis] + [axis]
    moved = b.op("MatMul", b.op("Transpose", r, perm=to_last), b.const(onehot))
    return b.op("Transpose", moved, perm=[int(i) for i in np.argsort(to_last)])


def _pad_params(unit):
    x = unit.inputs[0]
    rank = len(x.shape)
    pads = np.asarray(unit.inputs[1].values).reshape(-1)
    axes = (
        np.asarray(unit.inputs[3].values).reshape(-1)
        if len(unit.inputs) > 3 and unit.inputs[3].name
        else np.arange(rank)
    )
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[int(axis) % rank], full[int(axis) % rank + rank] = int(pads[i]), int(pads[i + len(axes)])
    return full


def _check_pad(unit):
    mode = unit.head.attrs.get("mode", "constant")
    if mode not in ("constant", b"constant"):
        return f"Pad mode {mode!r} is not supported (only constant)"
    if not is_constant(unit.inputs[1]) or unit.inputs[0].shape is None:
        return "Pad needs constant pads and a known input rank"
    if any(p < 0 for p in _pad_params(unit)):
        return "Pad with negative pads (cropping) is not supported"
    return None


@routing("Pad", check=_check_pad)
def padded(b, unit, relevance_out):
    """Drop the padding: slice R back to the input's extent."""
    pads = _pad_params(unit)
    rank = len(pads) // 2
    ends = [-p if p else np.iinfo(np.int64).max for p in pads[rank:]]
    return [
        b.op("Slice", relevance_out[0], b.ints(pads[:rank]), b.ints(ends), b.ints(list(range(rank))))
    ] + _inputs_after_first(unit)


def _check_gather(unit):
    x = unit.inputs[0]
    if not is_constant(unit.inputs[1]):
        if x.shape is None or len(x.shape) != 1:
            return "Gather with computed indices needs 1-D data"
        return None
    if np.asarray(unit.inputs[1].values).ndim > 1:
        return "Gather needs constant scalar or 1-D indices"
    if x.shape is None:
        return "Gather needs the rank of its data"
    return None


@routing("Gather", check=_check_gather)
def gathered(b, unit, relevance_out):
    """R_x = R contracted with the one-hot matrix H[l, d] = (indices[l] == d) along the axis.

    On an axis of dynamic size (a transformer's class token, hidden[:, 0], over T tokens), and for
    computed indices into 1-D data (the dynamo exporter's as_strided): R_x[d] = Σ_{l: idx[l] = d} R[l],
    a scatter (adding where indices repeat)."""
    x = unit.inputs[0]
    if not is_constant(unit.inputs[1]):
        flat = [b.op("Reshape", t, b.ints([-1])) for t in (unit.inputs[1], relevance_out[0])]
        return [b.op("ScatterElements", b.zeros_like(x), *flat, axis=0, reduction="add"), None]
    rank = len(x.shape)
    axis = _axis(unit) % rank
    indices = np.asarray(unit.inputs[1].values)
    r = relevance_out[0]
    if indices.ndim == 0:
        r = b.op("Unsqueeze", r, b.ints([axis]))
    n = x.shape[axis]
    if isinstance(n, int):
        return [_onto_axis(b, r, axis, indices, n, rank), None]
    along = indices.reshape([-1 if i == axis else 1 for i in range(rank)]).astype(np.int64)
    # -1 and T-1 are one place when T is dynamic: add unless the indices cannot meet
    distinct = len(set(indices.reshape(-1).tolist())) == indices.size and (indices >= 0).all()
    return [
        b.op(
            "ScatterElements",
            b.zeros_like(x),
            b.op("Expand", b.ints(along), b.shape(r)),
            r,
            axis=axis,
            **({} if distinct else {"reduction": "add"}),
        ),
        None,
    ]


def _check_gather_nd(unit):
    if unit.head.attrs.get("batch_dims", 0):
        return "GatherND with batch_dims other than 0 is not supported"
    return None


# R_data = ScatterND(0, indices, R, reduction=add)
@routing("GatherND", check=_check_gather_nd)
def gathered_nd(b, unit, relevance_out):
    """Each output slice is a copy of the data slice at its index (constant or computed, as in the
    dynamo exporter's AdaptiveAvgPool2d); where indices repeat, their relevance adds up."""
    data, indices = unit.inputs
    return [b.op("ScatterND", b.zeros_like(data), indices, relevance_out[0], reduction="add"), None]


def _check_scatter_nd(unit):
    reduction = unit.head.attrs.get("reduction", "none")
    if reduction not in ("none", b"none"):
        return f"ScatterND with reduction {reduction!r} is not supported (only none)"
    return None


# R_data = ScatterND(R, indices, 0), R_updates = GatherND(R, indices)
@routing("ScatterND", check=_check_scatter_nd)
def scattered_nd(b, unit, relevance_out):
    """The output is the data with the slices at the indices overwritten by the updates: each
    element's relevance goes to the one it was copied from."""
    indices, updates = unit.inputs[1:]
    r = relevance_out[0]
    r_data = b.op("ScatterND", r, indices, b.zeros_like(updates)) if unit.relevant[0] else None
    r_updates = b.op("GatherND", r, indices) if unit.relevant[2] else None
    return [r_data, None, r_updates]


# R_x = Where(cond, R, 0), R_y = Where(cond, 0, R), each summed over the axes it was broadcast along
@routing("Where")
def selected(b, unit, relevance_out):
    """Each output element is a copy of one branch's element (torch's masked_fill: a constant or
    an activation); the condition gets no relevance."""
    cond, x, y = unit.inputs
    r, zero, out = relevance_out[0], b.const(0.0), unit.outputs[0]
    r_x = b.unbroadcast(b.op("Where", cond, r, zero), x, out) if unit.relevant[1] else None
    r_y = b.unbroadcast(b.op("Where", cond, zero, r), y, out) if unit.relevant[2] else None
    return [None, r_x, r_y]

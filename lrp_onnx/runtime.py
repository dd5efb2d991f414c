"""Run an explainer graph on ONNX Runtime."""

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .convert import META_PREFIX, RELEVANCE, TARGET, convert
from .errors import InputError
from .load import read_model


def is_explainer(proto):
    return any(o.name == RELEVANCE for o in proto.graph.output) and any(i.name == TARGET for i in proto.graph.input)


class Explainer:
    """``Explainer(model).explain(x, target)`` -> (original outputs by name, relevance).

    ``model`` is an explainer graph, or a plain classifier that is converted in memory with
    ``composite`` and ``rule_params`` (as ``convert``). ``providers`` defaults to every provider
    ONNX Runtime has, CUDA first when present.
    """

    def __init__(self, model, providers=None, composite="alpha-beta", **rule_params):
        proto, _ = read_model(model)
        if not is_explainer(proto):
            proto = convert(proto, composite, **rule_params)
        meta = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
        self.input_name = meta.get("explained_input") or next(
            i.name for i in proto.graph.input if i.name != TARGET)
        self.composite = meta.get("composite")
        self.model = proto
        self.session = ort.InferenceSession(proto.SerializeToString(),
                                            providers=providers or ort.get_available_providers())
        self.output_names = [o.name for o in self.session.get_outputs() if o.name != RELEVANCE]
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def explain(self, x, target=None, **other_inputs):
        """Relevance of ``x`` for ``target`` (int, sequence of ints, or None/-1 for the predicted class).

        ``x`` is an array for the explained input, or a dict of every model input.
        """
        feeds = dict(x) if isinstance(x, dict) else {self.input_name: x}
        feeds.update(other_inputs)
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        unknown = sorted(set(feeds) - set(self.inputs))
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; the model takes {sorted(set(self.inputs) - {TARGET})}")
        batch = feeds[self.input_name].shape[0] if feeds[self.input_name].ndim else 1
        if target is None:
            target = -1
        feeds[TARGET] = np.broadcast_to(np.asarray(target, dtype=np.int64), (batch,)).copy()
        results = self.session.run(None, feeds)
        named = dict(zip([o.name for o in self.session.get_outputs()], results))
        relevance = named.pop(RELEVANCE)
        return {k: named[k] for k in self.output_names}, relevance


def save_model(proto: onnx.ModelProto, path):
    """Serialise ``proto`` to ``path`` atomically: a temporary file beside it, then a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lrp-onnx-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

"""Run an explainer graph on ONNX Runtime."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from .composites import DEFAULT_COMPOSITE
from .emit import LAYER_PREFIX, convert, is_explainer, read_metadata
from .errors import InputError, RelevanceWarning, RuleError
from .external import HeldWeights, save_with_external_data, wants_external_data
from .io.files import StrPath, atomic_write
from .io.inputs import InputSpec
from .load import ModelSource, read_model
from .plan import EXPLAINED_CLASS, EXPLAINED_LOGIT, RELEVANCE, TARGET

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .text import TextExplanation

# ORT execution providers: names, or (name, {option: value}) pairs
Providers = Sequence[Union[str, tuple[str, Mapping[str, Any]]]]
# The explained input's array, or {input name: array} of every model input (a dict: another
# mapping would be read as an array)
Feeds = Union[npt.ArrayLike, dict[str, Any]]
# A class index per sample (or one for all), -1 or None meaning the predicted class
Targets = Optional[npt.ArrayLike]

EXPLAINER_OUTPUTS = (RELEVANCE, EXPLAINED_CLASS, EXPLAINED_LOGIT)
SCORE_OUTPUTS = (EXPLAINED_CLASS, EXPLAINED_LOGIT)


def session_options(threads=None):
    """ORT options for explainers. Weight prepacking is off: it keeps a second, packed copy of every
    Gemm/MatMul weight and of the W⁺/W⁻ derived from it, which cost vgg16 1.1 GB of peak memory for
    no measured speed (benchmarks/LEVERS.md)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


ONNX_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
}

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def providers_for(name):
    """ORT providers for "cpu" or "cuda"; an InputError if this onnxruntime build lacks the device."""
    if name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; choose {' or '.join(PROVIDERS)}")
    if PROVIDERS[name][0] not in ort.get_available_providers():
        raise InputError(
            f"this onnxruntime has no {PROVIDERS[name][0]} (it has {ort.get_available_providers()}); "
            "for CUDA install lrp-onnx[gpu] and remove the CPU onnxruntime"
        )
    return PROVIDERS[name]


class Explainer:
    """``Explainer(model).explain(x, target)`` -> (original outputs by name, relevance).

    ``model`` is an explainer graph, or a plain classifier that is converted in memory with
    ``composite`` (default auto: attnlrp with attention, else alpha-beta) and ``rule_params``, as
    ``convert``. ``metadata`` says how the explainer was made (emit.metadata). ``providers`` is a list of
    ORT execution providers, or "cpu" / "cuda"; it defaults to every provider ONNX Runtime has, CUDA
    first when present. ``threads`` sets ORT's intra-op thread count (default: ORT's own choice).
    """

    def __init__(
        self,
        model: ModelSource,
        providers: Union[str, Providers, None] = None,
        composite: Optional[str] = None,
        threads: Optional[int] = None,
        **rule_params: Any,
    ) -> None:
        proto, label = read_model(model)
        if not is_explainer(proto):
            proto = convert(proto, composite or DEFAULT_COMPOSITE, **rule_params)
        elif composite is not None or rule_params:
            raise RuleError(
                f"{label} is already an explainer graph; composite and rule parameters apply only to plain classifiers"
            )
        self.label = label  # the model's path, or "<model>" for bytes and protos
        self.metadata = meta = read_metadata(proto)
        self.input_name = meta.get("explained_input") or next(i.name for i in proto.graph.input if i.name != TARGET)
        self.composite = meta.get("composite")
        self.model = proto
        if isinstance(providers, str):
            providers = providers_for(providers)
        self._options, self._providers = session_options(threads), providers or ort.get_available_providers()
        self.session = inference_session(proto, self._options, self._providers)
        self._scoring: Optional[ort.InferenceSession] = None  # made by score() when first needed
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = [
            name for name in outputs if name not in EXPLAINER_OUTPUTS and not name.startswith(LAYER_PREFIX)
        ]
        self.score_name = meta.get("score_output") or self.output_names[0]
        classes = outputs[self.score_name].shape[1]
        self.class_count = classes if isinstance(classes, int) else None
        self.input_shape = list(self.inputs[self.input_name].shape)
        self.input_dtype = np.dtype(ONNX_TYPES.get(self.inputs[self.input_name].type, np.float32))
        # token ids, explained at their embedding: relevance is [N, T] (plan.pick_input); an integer
        # image is explained at itself
        self.explains_tokens = (
            self.input_dtype.kind in "iu" and meta.get("explained_tensor", self.input_name) != self.input_name
        )
        self.relevance_shape = list(outputs[RELEVANCE].shape)

    @property
    def input_spec(self) -> InputSpec:
        """What the explained input takes, for reading images and arrays (io.inputs.InputSpec)."""
        return InputSpec(self.input_shape, self.input_dtype)

    def run(self, x: Feeds, target: Targets = None, **other_inputs: npt.ArrayLike) -> dict[str, Any]:
        """Every output by name: the original ones, ``relevance``, ``explained_class``, ``explained_logit``."""
        results = self.session.run(None, self._feeds(x, target, other_inputs))
        named = dict(zip([o.name for o in self.session.get_outputs()], results))
        warn_zero_relevance(named, f"input {self.input_name!r}")
        return named

    def score(self, x: Feeds, target: Targets = None, **other_inputs: npt.ArrayLike) -> dict[str, np.ndarray]:
        """``explained_class`` and ``explained_logit`` as ``run`` gives them, from the forward pass
        alone: ONNX Runtime runs every node of a graph whatever outputs are fetched, so this runs
        a copy of the explainer pruned to those two outputs, about one forward pass where the
        whole explainer costs several."""
        if self._scoring is None:
            self._scoring = inference_session(pruned(self.model, SCORE_OUTPUTS), self._options, self._providers)
        needed = {i.name for i in self._scoring.get_inputs()}
        feeds = {k: v for k, v in self._feeds(x, target, other_inputs).items() if k in needed}
        return dict(zip(SCORE_OUTPUTS, self._scoring.run(list(SCORE_OUTPUTS), feeds)))

    def _feeds(self, x, target, other_inputs):
        model_inputs = sorted(set(self.inputs) - {TARGET})
        typos = sorted(set(other_inputs) - set(self.inputs))
        if typos:  # explain(x, top_k=2): a keyword that is no model input, as Python would say it
            raise TypeError(
                f"unexpected keyword argument {typos[0]!r}: other keywords name the model's inputs, "
                f"which are {model_inputs}"
            )
        feeds = dict(x) if isinstance(x, dict) else {self.input_name: x}
        feeds.update(other_inputs)
        unknown = sorted(set(feeds) - set(self.inputs))
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; the model takes {model_inputs}")
        missing = [name for name in model_inputs if name not in feeds]
        if missing:  # explain(input_ids) without its attention_mask
            raise InputError(
                f"the model also takes {missing}: pass them as keywords "
                f"({', '.join(f'{name}=...' for name in missing)}) or all inputs as a dict"
            )
        feeds = {k: self._as_input_type(k, v) for k, v in feeds.items()}
        for name, value in feeds.items():
            self._check_input(name, value)
        batch = feeds[self.input_name].shape[0] if feeds[self.input_name].ndim else 1
        feeds[TARGET] = self._targets(target, batch)
        return feeds

    def explain(
        self, x: Feeds, target: Targets = None, **other_inputs: npt.ArrayLike
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Relevance of ``x`` for ``target`` (int, one int per sample, or None/-1 for the predicted class).

        ``x`` is an array for the explained input, or a dict of every model input.
        """
        named = self.run(x, target, **other_inputs)
        return {k: named[k] for k in self.output_names}, named[RELEVANCE]

    def explain_text(
        self,
        texts: Union[str, Iterable[str]],
        tokenizer: Union[StrPath, Tokenizer],
        target: Union[int, str, None] = None,
        top_k: Optional[int] = None,
        labels: Union[Sequence[str], StrPath, None] = None,
    ) -> list[TextExplanation]:
        """A ``text.TextExplanation`` (tokens, one relevance per token, class, logit) per text and
        target, for a model whose explained input is token ids. ``tokenizer`` is a path to a
        tokenizer.json or a ``tokenizers.Tokenizer``; padding is added and masked for a batch."""
        from . import text

        if not hasattr(tokenizer, "encode_batch"):
            tokenizer = text.load_tokenizer(tokenizer)
        return text.explain_texts(self, texts, tokenizer, target, top_k, labels)

    def check_sample(self, array: npt.ArrayLike) -> None:
        """An InputError if one sample (no batch axis) of the explained input would be refused by ``run``."""
        name = self.input_name
        self._check_input(name, self._as_input_type(name, np.asarray(array)[None]))

    def _check_input(self, name, value):
        """One-line InputErrors instead of ORT's messages, or of silently non-finite relevance: a
        fixed dimension that does not match, a wrong dtype, NaN or infinite values."""
        expected = self.inputs[name].shape
        if len(expected) != value.ndim or any(isinstance(d, int) and d != n for d, n in zip(expected, value.shape)):
            wanted = ["N" if not isinstance(d, int) else d for d in expected]
            raise InputError(f"input {name!r} takes shape {wanted}; got {list(value.shape)}")
        wanted = ONNX_TYPES.get(self.inputs[name].type)
        if wanted is not None and value.dtype != wanted:
            raise InputError(f"input {name!r} takes {np.dtype(wanted).name}; got {value.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise InputError(f"input {name!r} holds {bad} NaN or infinite value(s); relevance would not be finite")

    def _targets(self, target, batch):
        """int64 [batch]: one class index per sample, -1 meaning the predicted class."""
        target = np.asarray(-1 if target is None else target)
        if target.dtype.kind not in "iuf" or (target.dtype.kind == "f" and not np.all(np.mod(target, 1) == 0)):
            raise InputError(f"target must be integer class indices (or -1 for the predicted class); got {target!r}")
        target = target.astype(np.int64)
        if target.ndim > 1 or target.size not in (1, batch):
            raise InputError(f"target must be one class or one per sample ({batch}); got shape {target.shape}")
        classes = self.class_count
        bad = target[(target < -1) | ((target >= classes) if classes is not None else False)]
        if bad.size:
            limit = f"0..{classes - 1}" if classes is not None else "0 or more"
            raise InputError(
                f"target {int(bad[0])} is out of range: classes are {limit}, or -1 for the predicted class"
            )
        return np.broadcast_to(target.reshape(-1), (batch,)).copy()

    def _as_input_type(self, name, value):
        """Floats are cast to the input's float type (float64 images to float32, float32 to a float16
        model's float16), integers to its integer type; nothing else is. A finite float past the
        type's range is an InputError, where the cast would turn it into inf."""
        value = np.asarray(value)
        dtype = ONNX_TYPES.get(self.inputs[name].type)
        if dtype is not None and np.dtype(dtype).kind == "i" and value.dtype.kind in "iu":
            return value.astype(dtype)  # token ids and masks: int32 or int64, as the model takes them
        if dtype is None or np.dtype(dtype).kind != "f" or value.dtype.kind != "f":
            return value
        with np.errstate(over="ignore"):
            cast = value.astype(dtype)
        overflow = int((np.isinf(cast) & np.isfinite(value)).sum())
        if overflow:
            raise InputError(
                f"input {name!r} takes {np.dtype(dtype).name}, whose largest value is "
                f"{np.finfo(dtype).max:g}; {overflow} value(s) are beyond it"
            )
        return cast


def warn_zero_relevance(outputs, where):
    """A RelevanceWarning if some sample's relevance is exactly 0 everywhere while its explained
    logit is not: relevance that reached the input would sum to about that logit, so such a sample
    was not explained (relevance lost on the way; the plan refuses graphs where it always is)."""
    relevance, logit = outputs.get(RELEVANCE), outputs.get(EXPLAINED_LOGIT)
    if relevance is None or logit is None or not len(logit):
        return
    lost = np.flatnonzero(~relevance.reshape(len(logit), -1).any(axis=1) & (logit != 0))
    if lost.size:
        shown = ", ".join(map(str, lost[:5])) + (", ..." if lost.size > 5 else "")
        warnings.warn(
            RelevanceWarning(
                f"{where}: relevance is exactly 0 for {lost.size} of {len(logit)} sample(s) (index {shown}) whose "
                "explained logit is not 0; no relevance reached the input, so those are not explanations"
            ),
            stacklevel=3,
        )


def pruned(proto: onnx.ModelProto, outputs):
    """A model of the nodes, initializers and inputs of ``proto`` that ``outputs`` depend on; the
    rest is not copied. Nodes are walked from the last, as a valid graph lists them in
    topological order; a node with subgraphs also needs what its subgraphs read from outside."""
    graph, needed, kept = proto.graph, set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    part = onnx.GraphProto(name=graph.name)
    part.node.extend(reversed(kept))
    part.initializer.extend(t for t in graph.initializer if t.name in needed)
    part.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
    part.input.extend(i for i in graph.input if i.name in needed)
    part.output.extend(o for o in graph.output if o.name in outputs)
    part.value_info.extend(v for v in graph.value_info if v.name in needed)
    return onnx.helper.make_model(
        part, ir_version=proto.ir_version, opset_imports=proto.opset_import, functions=proto.functions
    )


def _subgraph_reads(node):
    """Every tensor name read inside ``node``'s subgraphs, at any depth (a superset of the names
    they take from outside, which is enough to keep what they need)."""
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in graph.node:
                yield from inner.input
                yield from _subgraph_reads(inner)


def inference_session(proto, options, providers):
    """An ORT session for ``proto``. One past protobuf's 2 GB limit cannot be handed over as bytes:
    it goes through a graph and data file in a temporary folder, read once as the session starts."""
    try:
        serialized = proto.SerializeToString()
    except EncodeError:  # past the limit (ByteSize cannot say beforehand: it serialises to measure)
        serialized = None
    if serialized is not None:
        return ort.InferenceSession(serialized, options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="lrp-onnx-") as folder:
        path = os.path.join(folder, "model.onnx")
        save_with_external_data(proto, path, atomic_write)
        return ort.InferenceSession(path, options, providers=providers)


def save_model(
    proto: onnx.ModelProto,
    path: StrPath,
    external_data: Optional[bool] = None,
    held: Optional[HeldWeights] = None,
) -> None:
    """Serialise ``proto`` to ``path`` atomically: a temporary file beside it, then a rename. With
    ``external_data`` (by default: past EXTERNAL_DATA_THRESHOLD, 256 MiB, which ONNX Runtime Web
    cannot load as one file, or protobuf's 2 GB limit), initializers over 1 MiB go to
    ``path + ".data"`` beside it, written the same way and first. ``held``: the HeldWeights of a
    proto from ``convert_held``; with external data, its bytes go to the data file from memory."""
    path = os.fspath(path)
    if external_data is None:
        external_data = wants_external_data(proto, held)
    if external_data:
        save_with_external_data(proto, path, atomic_write, held)
    elif held is not None:
        whole = onnx.ModelProto()
        whole.CopyFrom(proto)  # cheap: the weights are held, and ``proto`` stays as it was
        atomic_write(path, held.restored(whole).SerializeToString())
    else:
        atomic_write(path, proto.SerializeToString())

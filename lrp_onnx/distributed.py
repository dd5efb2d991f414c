"""Explanations past one machine, on Ray Data: ``map_batches`` over a pool of actors, each of which
loads the explainer once and holds one ONNX Runtime session.

``explain_dataset(data, explainer)`` takes a Ray Dataset with a column of model-ready arrays, or
input paths, and returns a Dataset with relevance columns. ``RayEngine`` is what ``explain
--engine ray`` runs: the driver lists the inputs, the actors read and explain them, and the
results come back in input order to the driver, which writes them as the local engine does
(io.run_folder), so both engines leave the same files and a killed run continues either way.

Needs the ``ray`` extra (``pip install "lrp-onnx[ray]"``) on the driver and on every worker, and
the inputs at the same paths on every worker (a shared file system).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union, cast

import numpy as np

from .errors import InputError
from .explain import ClassTarget, Explanation, Outcome, explain_stream
from .io.files import StrPath
from .io.inputs import InputReader, Pending, Preprocess, Sample, read_inputs
from .load import ModelSource
from .runtime import Explainer

if TYPE_CHECKING:
    from ray.data import Dataset

PENDING_FIELDS = ("name", "source", "path", "key", "row", "error")


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError('--engine ray needs Ray Data: pip install "lrp-onnx[ray]"') from None
    return ray


class ExplainBatches:
    """The actor of ``map_batches``: one Explainer per actor, made from the serialized explainer.
    A batch of Pending fields (the CLI's inputs) is read here; a batch with ``column`` holds
    model-ready arrays. Each row gets ``relevance``, ``explained_class``, ``explained_logit``,
    ``predicted`` and ``error`` (empty, or why the input could not be explained, its relevance
    then zeros); with ``top_k`` the first three have a leading axis of k."""

    def __init__(self, explainer, preprocess=None, column=None, target=None, top_k=None, threads=None, provider=None):
        self.explainer = Explainer(explainer, providers=provider, threads=threads)
        self.reader = InputReader(self.explainer.input_spec, preprocess or Preprocess())
        self.column, self.target, self.top_k = column, target, top_k

    def __call__(self, batch):
        count = len(next(iter(batch.values())))
        if self.column is None:
            inputs = [_pending(batch, i) for i in range(count)]
        else:
            inputs = [Sample(f"input{i}", f"<row {i}>", batch[self.column][i]) for i in range(count)]
        outcomes = list(
            explain_stream(
                self.explainer, inputs, self.target, self.top_k, batch_size=count, prefetch=1, reader=self.reader
            )
        )
        k = self.top_k or 1
        blank = np.zeros([d if isinstance(d, int) else 0 for d in self.explainer.input_shape[1:]], np.float32)
        columns = {"relevance": [], "explained_class": [], "explained_logit": [], "predicted": [], "error": []}
        for o in outcomes:
            e = o.explanations
            columns["relevance"].append(np.stack([x.relevance for x in e]) if e else np.stack([blank] * k))
            columns["explained_class"].append([x.target for x in e] if e else [-1] * k)
            columns["explained_logit"].append([x.logit for x in e] if e else [np.nan] * k)
            columns["predicted"].append(e[0].predicted if e else -1)
            columns["error"].append(o.error or "")
        out = dict(batch)
        for name, values in columns.items():
            values = np.array(values) if name != "relevance" or _same_shape(values) else _ragged(values)
            out[name] = values if self.top_k or name in ("predicted", "error") else _first(values)
        return out


def _pending(batch, i):
    """Row ``i`` of a batch of Pending fields; Arrow hands nulls back as None, or NaN in a column
    of numbers."""

    def value(field):
        v = batch[field][i]
        return None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v

    row = value("row")
    return Pending(
        str(value("name")),
        str(value("source")),
        str(value("path")),
        value("key"),
        None if row is None else int(row),
        value("error"),
    )


def _same_shape(arrays):
    return len({a.shape for a in arrays}) == 1


def _ragged(arrays):
    out = np.empty(len(arrays), object)
    out[:] = arrays
    return out


def _first(values):
    """Without top_k, one explanation per row: drop the leading axis of k = 1."""
    if values.dtype == object:
        return _ragged([v[0] for v in values])
    return values[:, 0]


def explain_dataset(
    data: Union[Dataset, Iterable[StrPath]],
    explainer: Union[Explainer, ModelSource],
    column: Optional[str] = "image",
    preprocess: Optional[Preprocess] = None,
    target: ClassTarget = None,
    top_k: Optional[int] = None,
    batch_size: int = 32,
    workers: int = 1,
    threads: int = 1,
    gpus: float = 0,
) -> Dataset:
    """``data`` with relevance columns (see ExplainBatches), computed on ``workers`` Ray actors of
    ``threads`` CPUs each (and ``gpus`` GPUs each, which selects ONNX Runtime's CUDA provider).

    ``data`` is a Ray Dataset whose ``column`` holds model-ready arrays, or a list of input paths
    (images, folders, .npy, .npz, read with ``preprocess`` as ``explain`` reads them; the rows then
    also hold each input's name and source). ``explainer`` is an Explainer, or a model path or
    bytes (a classifier is converted with the default composite). Ray must be initialised, or is
    started locally."""
    ray = _ray()
    if not isinstance(explainer, Explainer):
        explainer = Explainer(explainer, providers="cpu")
    if not isinstance(data, ray.data.Dataset):
        pending = read_inputs(list(data), explainer.input_spec, preprocess or Preprocess())
        data, column = ray.data.from_items([_fields(p) for p in pending]), None
    dataset = cast("Dataset", data)  # ray is imported when called: mypy cannot narrow by its isinstance
    # An actor that dies is started again and its batches are run again: Ray Data's actor pools
    # default to max_restarts=-1 and max_task_retries=-1 (tests/test_distributed.py kills one).
    return dataset.map_batches(
        ExplainBatches,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
        num_gpus=gpus or None,
        fn_constructor_kwargs={
            "explainer": explainer.model.SerializeToString(),
            "preprocess": preprocess,
            "column": column,
            "target": target,
            "top_k": top_k,
            "threads": threads,
            "provider": "cuda" if gpus else "cpu",
        },
    )


def _fields(pending):
    return {f: getattr(pending, f) for f in PENDING_FIELDS}


class RayEngine:
    """``explain --engine ray``: Outcomes in input order from a pool of Ray actors. ``address``:
    an existing cluster (``ray.init(address)``, or RAY_ADDRESS); None starts Ray on this machine."""

    def __init__(self, address: Optional[str] = None, workers: int = 1, threads: int = 1, gpus: float = 0) -> None:
        self.address, self.workers, self.threads, self.gpus = address, workers, threads, gpus

    def outcomes(
        self,
        explainer: Explainer,
        pending: Iterable[Pending],
        target: ClassTarget,
        top_k: Optional[int],
        labels: Optional[Sequence[str]],
        batch_size: int,
        preprocess: Optional[Preprocess],
    ) -> Iterator[Outcome]:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # parts are written in input order
        context.enable_progress_bars = False  # the CLI's own bar counts the inputs
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        pending = list(pending)
        if not pending:
            return
        data = ray.data.from_items([_fields(p) for p in pending])
        results = explain_dataset(
            data, explainer, None, preprocess, target, top_k, batch_size, self.workers, self.threads, self.gpus
        )
        index = 0
        for batch in results.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            for i in range(len(batch["name"])):
                yield _outcome(batch, i, index, top_k, labels)
                index += 1


def _outcome(batch, i, index, top_k, labels):
    name, source, error = str(batch["name"][i]), str(batch["source"][i]), str(batch["error"][i])
    if error:
        return Outcome(index, name, source, [], error)
    sample = Sample(name, source, None)
    per_rank = (lambda column: batch[column][i]) if top_k else (lambda column: [batch[column][i]])
    explanations = [
        Explanation(sample, int(c), int(batch["predicted"][i]), float(logit), np.asarray(r), labels)
        for c, logit, r in zip(per_rank("explained_class"), per_rank("explained_logit"), per_rank("relevance"))
    ]
    return Outcome(index, name, source, explanations)

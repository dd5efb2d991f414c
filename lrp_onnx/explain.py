"""The ``explain`` job: image files or arrays → batches → explainer → Explanations, heatmaps,
relevance shards and summaries, streamed."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union, cast

import numpy as np
from PIL import Image

from .errors import InputError
from .io.files import StrPath, atomic_write, png_bytes
from .io.heatmap import heatmap
from .io.inputs import (
    InputItem,
    InputReader,
    InputSpec,
    Preprocess,
    Sample,
    identity,
    load_samples,
    read_inputs,
)
from .io.prefetch import prefetched
from .io.progress import progress_bar
from .io.run_folder import RunFolder, Totals, default_run_folder, default_shard_inputs

if TYPE_CHECKING:
    from .distributed import RayEngine
    from .runtime import Explainer

# The class to explain: an index, a label name (with labels), or None (also -1 or "predicted") for the predicted one
ClassTarget = Union[int, str, None]
# Class names: a list, or a file of one name per line
Labels = Union[Sequence[str], StrPath, None]


@dataclass
class Explanation:
    sample: Sample
    target: int
    predicted: int
    logit: float  # the explained class's logit (pre-softmax): the seed of the relevance
    relevance: np.ndarray  # one sample, the explained input's shape without the batch axis
    labels: Optional[Sequence[str]] = None

    def label(self, k: int) -> str:
        return self.labels[k] if self.labels else str(k)

    def __repr__(self) -> str:
        return (
            f"Explanation({self.sample.name!r}, target={self.label(self.target)!r}, "
            f"predicted={self.label(self.predicted)!r}, logit={float(self.logit):.4g}, "
            f"relevance={list(self.relevance.shape)} Σ={float(self.relevance.sum()):.4g})"
        )

    def as_dict(self) -> dict[str, Any]:
        """The summary row (``summary``): the same method name as TextExplanation's."""
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """One row: prediction, target, logit, Σ R, conservation Σ R / logit, positive and negative shares."""
        r = self.relevance.astype(np.float64)
        positive, negative = r[r > 0].sum(), -r[r < 0].sum()
        total = positive + negative
        return {
            "input": self.sample.name,
            "source": self.sample.source,
            "predicted": self.predicted,
            "predicted_label": self.label(self.predicted),
            "target": self.target,
            "target_label": self.label(self.target),
            "logit": float(self.logit),
            "relevance_sum": float(r.sum()),
            "conservation": float(r.sum() / self.logit) if self.logit else float("nan"),
            "positive_share": float(positive / total) if total else 0.0,
            "negative_share": float(negative / total) if total else 0.0,
            "positive_negative_ratio": float(positive / negative) if negative else float("inf"),
        }


def read_labels(path: StrPath) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read labels file ({e})") from None


PREDICTED = ("-1", "predicted")  # the target that means the predicted class, as the graph's -1


def resolve_target(target: ClassTarget, labels: Optional[Sequence[str]], classes: Optional[int]) -> Optional[int]:
    """An int class, a label name (with a labels file), or None for the predicted class (None, -1
    or "predicted", as in the explainer graph and the Python API)."""
    if target is None or str(target) in PREDICTED:
        return None
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if not labels or target not in labels:
            raise InputError(
                f"target {target!r} is not a class index"
                + (" or a label in the labels file" if labels else "; pass --labels to use names")
            )
        return labels.index(target)
    index = int(target)
    if classes is not None and not 0 <= index < classes:
        raise InputError(f"target {index} is out of range: the model has {classes} classes (0..{classes - 1})")
    return index


def check_request(
    explainer: Explainer, target: ClassTarget = None, top_k: Optional[int] = None, labels: Labels = None
) -> tuple[Optional[int], Optional[Sequence[str]]]:
    """(the target as a class index or None, the labels as a list or None), after checking them and
    top-k against the model. ``labels``: a list of class names, or a file of one name per line."""
    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels(labels)
    classes = explainer.class_count
    if labels is not None and classes is not None and len(labels) != classes:
        raise InputError(f"the labels file has {len(labels)} labels but the model has {classes} classes")
    if top_k is not None and not (1 <= top_k and (classes is None or top_k <= classes)):
        raise InputError(f"--top-k {top_k} must be between 1 and the class count ({classes})")
    if top_k is not None and target is not None:
        raise InputError("give --target or --top-k, not both")
    return resolve_target(target, labels, classes), labels


@dataclass
class Outcome:
    """One input's result, in input order: its explanations (one per explained class), or the
    reason it has none."""

    index: int
    name: str
    source: str
    explanations: list
    error: Optional[str] = None


def explain_stream(explainer, inputs, target=None, top_k=None, labels=None, batch_size=32, prefetch=2, reader=None):
    """Outcomes of ``inputs`` (an iterable of ``io.inputs.Pending``, read by ``reader``, an
    ``io.inputs.InputReader``; or of Samples or model-ready arrays), lazily: inputs are read,
    explained and handed over in batches, each stage in its own thread, at most ``prefetch``
    batches ahead, so memory depends on ``batch_size``, not on the number of inputs. An input
    that cannot be read or does not fit the model is an Outcome with an error, and the rest go on."""
    target, labels = check_request(explainer, target, top_k, labels)
    reader = reader or InputReader(explainer.input_spec, Preprocess())
    loaded = prefetched(_read_batches(explainer, inputs, batch_size, reader), prefetch)
    return _flatten(prefetched(_explained_batches(explainer, loaded, target, top_k, labels), prefetch))


def _read_batches(explainer, inputs, batch_size, reader):
    """Lists of (index, Sample, error) of up to ``batch_size`` inputs whose samples share one shape
    (a model with free spatial dimensions takes images of several sizes). A sample that could not
    be read has no array, and the error says why."""
    batch, shape = [], None
    for index, item in enumerate(inputs):
        try:
            sample, error = reader.read(item, index), None
            explainer.check_sample(sample.array)
        except InputError as e:
            sample, error = Sample(*identity(item, index), None), str(e)
        fits = error is not None or shape is None or sample.array.shape == shape
        if batch and (len(batch) == batch_size or not fits):
            yield batch
            batch, shape = [], None
        if error is None:
            shape = sample.array.shape
        batch.append((index, sample, error))
    if batch:
        yield batch


def _explained_batches(explainer, batches, target, top_k, labels):
    """A list of Outcomes per batch: one run per explained rank over the batch's readable samples."""
    for batch in batches:
        readable = [(i, sample) for i, sample, error in batch if error is None]
        explained = {i: [] for i, _ in readable}
        if readable:
            for run, predicted in ranked_runs(explainer, np.stack([s.array for _, s in readable]), target, top_k):
                for k, (i, sample) in enumerate(readable):
                    explained[i].append(
                        Explanation(
                            sample,
                            int(run["explained_class"][k]),
                            int(predicted[k]),
                            float(run["explained_logit"][k]),
                            run["relevance"][k],
                            labels,
                        )
                    )
        yield [Outcome(i, sample.name, sample.source, explained.get(i, []), error) for i, sample, error in batch]


def _flatten(batches):
    for batch in batches:
        yield from batch


def explain_samples(explainer, samples, target=None, top_k=None, labels=None, batch_size=32, progress=False):
    """Yield an Explanation per sample and target: the given target, the top-k classes, or the
    prediction; the first sample that does not fit the model is an InputError."""
    bar = progress_bar(len(samples) * (top_k or 1), progress)
    for outcome in explain_stream(explainer, samples, target, top_k, labels, batch_size):
        if outcome.error is not None:
            raise InputError(outcome.error)
        yield from outcome.explanations
        bar.update(len(outcome.explanations))
    bar.close()


def ranked_runs(explainer, feeds, target=None, top_k=None):
    """Yield (run, predicted classes) per explained rank: the target's run, or the top-k classes' runs.
    One run gives the scores and the first explanation (top-1 is the predicted class, -1)."""
    first = explainer.run(feeds, -1 if target is None else target)
    ranked = np.argsort(-first[explainer.score_name], axis=1, kind="stable")
    for rank in range(top_k or 1):
        yield (first if rank == 0 else explainer.run(feeds, ranked[:, rank])), ranked[:, 0]


def explain_images(
    explainer: Explainer,
    inputs: Union[InputItem, Sequence[InputItem]],
    target: ClassTarget = None,
    top_k: Optional[int] = None,
    labels: Labels = None,
    preprocess: Optional[Preprocess] = None,
    batch_size: int = 32,
) -> list[Explanation]:
    """Explanations of ``inputs``, one or a list of: image files, folders, ``.npy``/``.npz`` files,
    PIL images, and numpy arrays. Images (files or PIL) are preprocessed for ``explainer`` as
    ``lrp-onnx explain`` does (``preprocess``, an ``io.inputs.Preprocess``); arrays are model-ready,
    one sample or a batch along axis 0, as ``.npy`` files are. ``labels`` is a list of class names
    or a file of them; ``target`` a class index or label name, ``top_k`` the K highest classes,
    neither the predicted class. Returns a list of ``Explanation`` (sample, target, predicted,
    logit, relevance, summary()), in the order of the inputs.
    """
    # a list is several inputs; a bare array is one input (one sample, or a batch)
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [cast(InputItem, inputs)]
    samples = load_samples(items, explainer.input_spec, preprocess or Preprocess())
    return list(explain_samples(explainer, samples, target, top_k, labels, batch_size))


def write_heatmap(
    e: Explanation, folder: StrPath, cmap: str = "bwr", overlay: bool = False, channel_axis: int = 0, zoom: int = 1
) -> str:
    """<input>_class<k>.png: the heatmap, the input's size × zoom; returns the file's name."""
    name = f"{e.sample.name}_class{e.target}.png"
    # one sample's relevance: one image
    image = cast(Image.Image, heatmap(e.relevance, cmap, channel_axis, overlay=e.sample.image if overlay else None))
    if zoom > 1:
        # Pillow sets Image.NEAREST with setattr (Image.Resampling needs Pillow 9.1; the floor is 9)
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)  # type: ignore[attr-defined]
    # renamed into place, not flushed to disk: the part that lists it is (io.run_folder)
    atomic_write(os.path.join(folder, name), png_bytes(image), durable=False)
    return name


def explain_to_folder(
    explainer: Explainer,
    inputs: Union[StrPath, Iterable[StrPath]],
    folder: Optional[StrPath],
    preprocess: Optional[Preprocess] = None,
    target: ClassTarget = None,
    top_k: Optional[int] = None,
    labels: Labels = None,
    batch_size: int = 32,
    cmap: str = "bwr",
    overlay: bool = False,
    as_json: bool = False,
    progress: bool = True,
    zoom: int = 1,
    heatmaps: bool = True,
    relevance_dtype: str = "float32",
    shard_inputs: Optional[int] = None,
    restart: bool = False,
    fail_fast: bool = False,
    prefetch: int = 2,
    engine: Optional[RayEngine] = None,
) -> tuple[Totals, list[str]]:
    """The CLI's explain job over image files, folders and arrays, streamed in batches: heatmaps,
    relevance shards and summaries in ``folder`` (None: ``io.run_folder.default_run_folder``, one
    per model and settings), laid out as ``io.run_folder`` describes. A folder
    left by a run with the same settings is continued; ``restart`` discards it. An input that
    cannot be explained becomes a summary row with its error (``fail_fast``: an InputError).
    ``engine`` (a ``distributed.RayEngine``) explains on Ray actors instead of in this process;
    the files are the same. Returns the run's ``Totals`` and the summaries written."""
    if engine is not None and overlay:
        raise InputError("--overlay is not available with --engine ray: the workers do not send the images back")
    preprocess = preprocess or Preprocess()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    spec = explainer.input_spec
    pending = list(read_inputs(inputs, spec, preprocess))  # locators only, counted for the progress bar
    target, labels = check_request(explainer, target, top_k, labels)  # a label name becomes its class index
    # relevance is laid out as the input, or as the tensor inside the graph it is given at
    layout = (
        spec.layout(preprocess.layout)
        if explainer.relevance_shape == spec.shape
        else InputSpec(explainer.relevance_shape).layout()
    )
    draw = functools.partial(
        write_heatmap, cmap=cmap, overlay=overlay, zoom=zoom, channel_axis=0 if layout == "nchw" else -1
    )
    shard_inputs = shard_inputs or default_shard_inputs(
        [d if isinstance(d, int) else 224 for d in spec.shape[1:]], relevance_dtype, top_k or 1
    )
    settings = {
        "explainer": explainer.metadata,
        "inputs": [os.path.abspath(p) for p in inputs],
        "preprocess": dataclasses.asdict(preprocess),
        "target": target,
        "top_k": top_k,
        "labels": labels,
        "heatmaps": {"cmap": cmap, "overlay": overlay, "zoom": zoom} if heatmaps else None,
        "relevance_dtype": relevance_dtype,
        "shard_inputs": shard_inputs,
    }
    folder = folder or default_run_folder(explainer.label, settings)
    run = RunFolder(folder, settings, shard_inputs, relevance_dtype, draw if heatmaps else None, restart)
    completed = False
    try:
        remaining = run.skip_done(pending)
        bar = progress_bar(len(pending) - run.totals.resumed, progress, unit="input")
        if engine is None:
            outcomes = explain_stream(
                explainer, remaining, target, top_k, labels, batch_size, prefetch, InputReader(spec, preprocess)
            )
        else:
            outcomes = engine.outcomes(explainer, remaining, target, top_k, labels, batch_size, preprocess)
        for outcome in outcomes:
            if fail_fast and outcome.error is not None:
                raise InputError(outcome.error)
            run.add(outcome)
            bar.update(1)
        bar.close()
        result = run.finish(as_json)
        completed = True
    finally:
        run.close(completed)
    return result

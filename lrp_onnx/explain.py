"""The ``explain`` job: image files or arrays → batches → explainer → Explanations, heatmaps,
relevance files and a summary."""

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from .errors import InputError
from .io.files import atomic_write, png_bytes, writable_folder
from .io.heatmap import heatmap
from .io.inputs import InputSpec, Preprocess, Sample, batches, load_samples
from .io.progress import progress_bar


@dataclass
class Explanation:
    sample: Sample
    target: int
    predicted: int
    logit: float             # the explained class's logit (pre-softmax): the seed of the relevance
    relevance: np.ndarray    # one sample, the explained input's shape without the batch axis
    labels: Optional[list] = None

    def label(self, k):
        return self.labels[k] if self.labels else str(k)

    def summary(self):
        """One row: prediction, target, logit, Σ R, conservation Σ R / logit, positive and negative shares."""
        r = self.relevance.astype(np.float64)
        positive, negative = r[r > 0].sum(), -r[r < 0].sum()
        total = positive + negative
        return {
            "input": self.sample.name, "source": self.sample.source,
            "predicted": self.predicted, "predicted_label": self.label(self.predicted),
            "target": self.target, "target_label": self.label(self.target),
            "logit": float(self.logit), "relevance_sum": float(r.sum()),
            "conservation": float(r.sum() / self.logit) if self.logit else float("nan"),
            "positive_share": float(positive / total) if total else 0.0,
            "negative_share": float(negative / total) if total else 0.0,
            "positive_negative_ratio": float(positive / negative) if negative else float("inf"),
        }


def read_labels(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read labels file ({e})") from None


def resolve_target(target, labels, classes):
    """An int class, a label name (with a labels file), or None (the predicted class)."""
    if target is None:
        return None
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if not labels or target not in labels:
            raise InputError(f"target {target!r} is not a class index" +
                             (" or a label in the labels file" if labels else "; pass --labels to use names"))
        return labels.index(target)
    index = int(target)
    if classes is not None and not 0 <= index < classes:
        raise InputError(f"target {index} is out of range: the model has {classes} classes (0..{classes - 1})")
    return index


def check_request(explainer, target=None, top_k=None, labels=None):
    """The target as a class index (or None), after checking it, top-k and labels against the model."""
    classes = explainer.class_count
    if labels is not None and classes is not None and len(labels) != classes:
        raise InputError(f"the labels file has {len(labels)} labels but the model has {classes} classes")
    if top_k is not None and not (1 <= top_k and (classes is None or top_k <= classes)):
        raise InputError(f"--top-k {top_k} must be between 1 and the class count ({classes})")
    if top_k is not None and target is not None:
        raise InputError("give --target or --top-k, not both")
    return resolve_target(target, labels, classes)


def explain_samples(explainer, samples, target=None, top_k=None, labels=None, batch_size=32, progress=False):
    """Yield an Explanation per sample and target: the given target, the top-k classes, or the prediction."""
    target = check_request(explainer, target, top_k, labels)
    bar = progress_bar(len(samples) * (top_k or 1), progress)
    for batch in batches(samples, batch_size):
        for run, predicted in ranked_runs(explainer, np.stack([s.array for s in batch]), target, top_k):
            for i, sample in enumerate(batch):
                yield Explanation(sample, int(run["explained_class"][i]), int(predicted[i]),
                                  float(run["explained_logit"][i]), run["relevance"][i], labels)
            bar.update(len(batch))
    bar.close()


def ranked_runs(explainer, feeds, target=None, top_k=None):
    """Yield (run, predicted classes) per explained rank: the target's run, or the top-k classes' runs.
    One run gives the scores and the first explanation (top-1 is the predicted class, -1)."""
    first = explainer.run(feeds, -1 if target is None else target)
    ranked = np.argsort(-first[explainer.score_name], axis=1, kind="stable")
    for rank in range(top_k or 1):
        yield (first if rank == 0 else explainer.run(feeds, ranked[:, rank])), ranked[:, 0]


def explain_images(explainer, inputs, target=None, top_k=None, labels=None, preprocess=None, batch_size=32):
    """Explanations of image files, folders, ``.npy``/``.npz`` files, preprocessed for ``explainer``.

    ``preprocess`` is an ``io.inputs.Preprocess``; ``labels`` a list of class names; ``target`` a
    class index or label name, ``top_k`` the K highest classes, neither the predicted class.
    Returns a list of ``Explanation`` (sample, target, predicted, logit, relevance, summary()).
    """
    samples = load_samples(inputs if isinstance(inputs, (list, tuple)) else [inputs],
                           InputSpec(explainer.input_shape), preprocess or Preprocess())
    return list(explain_samples(explainer, samples, target, top_k, labels, batch_size))


def write_explanation(e: Explanation, folder, cmap="bwr", overlay=False, channel_axis=0, zoom=1):
    """<input>_class<k>.png (heatmap, the input's size × zoom) and <input>_class<k>.npy (raw relevance)."""
    stem = f"{e.sample.name}_class{e.target}"
    image = heatmap(e.relevance, cmap, channel_axis, overlay=e.sample.image if overlay else None)
    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    npy = io.BytesIO()
    np.save(npy, e.relevance, allow_pickle=False)
    atomic_write(os.path.join(folder, stem + ".png"), png_bytes(image))
    atomic_write(os.path.join(folder, stem + ".npy"), npy.getvalue())
    return stem + ".png", stem + ".npy"


def write_summary(rows, folder, as_json=False):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(folder, "summary.csv"), text.getvalue().encode())
    if as_json:
        atomic_write(os.path.join(folder, "summary.json"), json.dumps(rows, indent=2).encode())


def explain_to_folder(explainer, inputs, folder, preprocess=None, target=None, top_k=None, labels=None,
                      batch_size=32, cmap="bwr", overlay=False, as_json=False, progress=True, zoom=1):
    """The whole CLI job; every input is read and checked before anything is written."""
    spec = InputSpec(explainer.input_shape)
    samples = load_samples(inputs, spec, preprocess or Preprocess())
    check_request(explainer, target, top_k, labels)
    writable_folder(folder)
    layout = spec.layout(preprocess.layout if preprocess else None)
    rows = []
    for e in explain_samples(explainer, samples, target, top_k, labels, batch_size, progress):
        png, npy = write_explanation(e, folder, cmap, overlay, 0 if layout == "nchw" else -1, zoom)
        rows.append(dict(e.summary(), heatmap=png, relevance_file=npy))
    write_summary(rows, folder, as_json)
    return rows

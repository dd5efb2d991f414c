"""Check a conversion end to end: the explainer reproduces the model's outputs, its relevance is
finite, and Σ relevance is compared with the explained logit (conservation)."""

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .emit import convert
from .load import ModelSource, read_model
from .runtime import ONNX_TYPES, Explainer, inference_session, session_options


@dataclass
class Verification:
    output_deviation: float  # max over outputs of max|explainer − model| / max|model|
    finite: bool  # every relevance value is finite
    conservation_error: float  # max over samples of |Σ R − explained logit| / |explained logit|
    convert_seconds: float
    explain_seconds: float


def random_feeds(session, batch, seed=0):
    """Inputs for every graph input of ``session``: standard normal floats, zeros for integer and
    boolean inputs, ``batch`` for every dynamic dimension. Models with a constrained input range
    (images in [0, 1], say) should be given their own ``feeds``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        dtype = ONNX_TYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input {spec.name!r} has type {spec.type}; pass its values explicitly")
        value = rng.standard_normal(shape) if np.dtype(dtype).kind == "f" else np.zeros(shape)
        feeds[spec.name] = value.astype(dtype)
    return feeds


def _as_array(value):
    """ORT returns ZipMap outputs as a list of {class: probability}; compare those as arrays."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return np.array([[row[k] for k in sorted(row)] for row in value])
    return np.asarray(value)


def _relative_deviation(actual, expected):
    actual, expected = _as_array(actual), _as_array(expected)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.dtype.kind not in "fc":
        return float(not np.array_equal(actual, expected))
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)) / scale


def verify(
    model: ModelSource,
    composite: str = "epsilon-plus-flat",
    feeds: Optional[dict[str, np.ndarray]] = None,
    batch: int = 2,
    threads: Optional[int] = None,
    **rule_params: Any,
) -> Verification:
    """Convert ``model`` and run it against the original on ``feeds`` (random ones by default).

    Both run on ONNX Runtime's CPU provider with ``Explainer``'s session options; every original
    output must agree, label and ZipMap outputs included (``convert`` has run ``onnx.checker``'s full check).
    """
    proto, _ = read_model(model)
    original = inference_session(proto, session_options(threads), ["CPUExecutionProvider"])
    feeds = feeds if feeds is not None else random_feeds(original, batch)
    expected = dict(zip([o.name for o in original.get_outputs()], original.run(None, feeds)))
    start = time.perf_counter()
    explainer_proto = convert(proto, composite, **rule_params)
    converted = time.perf_counter()
    explainer = Explainer(explainer_proto, providers="cpu", threads=threads)
    ran = time.perf_counter()
    named = explainer.run(feeds)
    explained = time.perf_counter() - ran
    deviation = max(_relative_deviation(named[name], value) for name, value in expected.items())
    relevance = named["relevance"].astype(np.float64)
    totals = relevance.reshape(relevance.shape[0], -1).sum(1)
    logit = named["explained_logit"].astype(np.float64)
    conservation = float(np.max(np.abs(totals - logit) / np.maximum(np.abs(logit), 1e-12)))
    return Verification(deviation, bool(np.isfinite(relevance).all()), conservation, converted - start, explained)

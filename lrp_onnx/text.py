"""Text classifiers: tokenize with a Hugging Face ``tokenizers`` file (the ``text`` extra), explain
at the token embeddings (one relevance per token, plan.pick_input), and show the tokens coloured by
relevance as an HTML page, with their values as JSON."""

import html
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError
from .explain import check_request, ranked_runs
from .io.files import atomic_write, writable_folder
from .io.heatmap import colormap
from .plan import TARGET

# Model inputs a tokenizer fills, by name, from each encoding's attribute of the same meaning.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
PAD_TOKENS = ("[PAD]", "<pad>")


@dataclass
class TextExplanation:
    text: str
    tokens: list[str]
    relevance: np.ndarray  # one value per token, padding removed
    target: int
    predicted: int
    logit: float
    labels: Optional[Sequence[str]] = None

    def label(self, k: int) -> str:
        return self.labels[k] if self.labels else str(k)

    def __repr__(self) -> str:
        return (
            f"TextExplanation({self.text!r}, target={self.label(self.target)!r}, "
            f"predicted={self.label(self.predicted)!r}, logit={float(self.logit):.4g}, "
            f"{len(self.tokens)} tokens Σ={float(self.relevance.sum()):.4g})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "predicted": self.predicted,
            "predicted_label": self.label(self.predicted),
            "target": self.target,
            "target_label": self.label(self.target),
            "logit": self.logit,
            "relevance_sum": float(self.relevance.sum()),
            "tokens": [{"token": t, "relevance": float(r)} for t, r in zip(self.tokens, self.relevance)],
        }


def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file (no download)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("explaining text needs the tokenizers package: pip install 'lrp-onnx[text]'") from None
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # tokenizers raises its own Exception subclass, with a multi-line message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read the tokenizer ({reason})") from None


def encode(explainer, tokenizer, texts):
    """The model's feeds for the list ``texts`` (padded to one length, attention_mask 0 on the padding), and
    each text's Encoding. A model with a fixed sequence length is padded to it."""
    if not texts:
        raise InputError("no text to explain")
    unknown = [name for name in explainer.inputs if name not in ENCODING_FIELDS and name != TARGET]
    if unknown:
        raise InputError(
            f"the model takes input(s) {unknown} that a tokenizer does not make; it makes {', '.join(ENCODING_FIELDS)}"
        )
    encodings = tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    fixed = explainer.input_shape[1] if len(explainer.input_shape) == 2 else None
    length = fixed if isinstance(fixed, int) else longest
    if longest > length:
        raise InputError(f"a text has {longest} tokens; the model takes {length}")
    pad = _pad_id(tokenizer)
    feeds = {}
    for name in explainer.inputs:
        if name in ENCODING_FIELDS:
            fill = pad if name == "input_ids" else 0
            rows = [list(getattr(e, ENCODING_FIELDS[name])) for e in encodings]
            feeds[name] = np.array([row + [fill] * (length - len(row)) for row in rows], np.int64)
    return feeds, encodings


def _pad_id(tokenizer):
    if tokenizer.padding:
        return tokenizer.padding["pad_id"]
    ids = [tokenizer.token_to_id(t) for t in PAD_TOKENS]
    return next((i for i in ids if i is not None), 0)


def explain_texts(explainer, texts, tokenizer, target=None, top_k=None, labels=None):
    """A TextExplanation per text and target (the given one, the top-k classes, or the prediction)."""
    if not explainer.explains_tokens:
        raise InputError(f"the model explains input {explainer.input_name!r}, which is not token ids")
    texts = [texts] if isinstance(texts, str) else list(texts)
    target, labels = check_request(explainer, target, top_k, labels)
    feeds, encodings = encode(explainer, tokenizer, texts)
    out = []
    for run, predicted in ranked_runs(explainer, feeds, target, top_k):
        for i, (text, encoding) in enumerate(zip(texts, encodings)):
            n = len(encoding.ids)
            out.append(
                TextExplanation(
                    text,
                    list(encoding.tokens),
                    run["relevance"][i, :n],
                    int(run["explained_class"][i]),
                    int(predicted[i]),
                    float(run["explained_logit"][i]),
                    labels,
                )
            )
    return out


def token_table(e: TextExplanation):
    """The tokens and their relevance as printed lines, with a header naming the class."""
    width = max(len(t) for t in e.tokens)
    head = (
        f"{e.text!r}: class {e.label(e.target)} (predicted {e.label(e.predicted)}), logit {e.logit:.4g}, "
        f"Σ R {e.relevance.sum():.4g}"
    )
    return "\n".join([head] + [f"  {t:<{width}}  {r:+.4g}" for t, r in zip(e.tokens, e.relevance)])


def token_html(explanations, cmap="bwr"):
    """One page: each text's tokens on a background coloured by relevance (0 white, ±max|R| of that
    text at the colormap's ends), the value on hover."""
    blocks = []
    for e in explanations:
        peak = np.abs(e.relevance).max() or 1.0
        colours = colormap((e.relevance / peak + 1) / 2, cmap)
        spans = " ".join(
            f'<span title="{r:+.4g}" style="background:rgb({c[0]},{c[1]},{c[2]})">{html.escape(t)}</span>'
            for t, r, c in zip(e.tokens, e.relevance, colours)
        )
        blocks.append(
            f"<h2>{html.escape(e.text)}</h2>\n<p>class {html.escape(e.label(e.target))} "
            f"(predicted {html.escape(e.label(e.predicted))}), logit {e.logit:.4g}, "
            f"Σ R {e.relevance.sum():.4g}</p>\n<p class=tokens>{spans}</p>"
        )
    style = "body{font-family:sans-serif} .tokens span{padding:2px 3px;margin:1px;border-radius:3px;line-height:2}"
    return (
        f"<!doctype html>\n<html><head><meta charset=utf-8><title>lrp-onnx: token relevance</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(blocks) + "\n</body></html>\n"
    )


def write_text_explanations(explanations, folder, cmap="bwr"):
    """text.html and text.json in ``folder``, each written whole or not at all."""
    writable_folder(folder)
    atomic_write(os.path.join(folder, "text.html"), token_html(explanations, cmap).encode())
    atomic_write(os.path.join(folder, "text.json"), json.dumps([e.as_dict() for e in explanations], indent=2).encode())
    return ["text.html", "text.json"]

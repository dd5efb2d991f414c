"""The README's Python examples run as written, and the bundled model is what the README says."""

import os
import re

import numpy as np
import onnxruntime as ort

import lrp_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run(monkeypatch, tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})


def test_bundled_digits_cnn_accuracy_and_explanations():
    """Held-out accuracy from the ONNX file itself (the training script's split), and finite relevance."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    path = os.path.join(ROOT, "models", "digits_cnn.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    accuracy = (session.run(None, {"image": x_test})[0].argmax(1) == y_test).mean()
    assert accuracy >= 0.97
    assert os.path.getsize(path) < 300_000
    outputs, relevance = lrp_onnx.Explainer(path, composite="epsilon-plus-flat").explain(x_test[:50])
    assert np.isfinite(relevance).all() and relevance.shape == x_test[:50].shape

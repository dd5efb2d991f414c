"""The README's Python examples run as written, and the bundled model is what the README says."""

import os
import re

import numpy as np
import onnxruntime as ort
import pytest

import lrp_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run(monkeypatch, tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})


def held_out_digits():
    """The training scripts' held-out split (seeded, stratified 25 %)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_test, y_test


@pytest.mark.parametrize("name,input_name,flat", [("digits_cnn", "image", False), ("digits_mlp", "features", True)])
def test_bundled_models_accuracy_and_explanations(name, input_name, flat):
    """Held-out accuracy from the committed ONNX file itself (nothing is retrained), and finite relevance."""
    x_test, y_test = held_out_digits()
    x = x_test.reshape(len(x_test), -1) if flat else x_test
    path = os.path.join(ROOT, "models", f"{name}.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    scores = session.run(None, {input_name: x})[-1]  # the MLP's outputs are (label, probabilities)
    assert (scores.argmax(1) == y_test).mean() >= 0.97
    assert os.path.getsize(path) < 300_000
    outputs, relevance = lrp_onnx.Explainer(path, composite="epsilon-plus-flat").explain(x[:50])
    assert np.isfinite(relevance).all() and relevance.shape == x[:50].shape

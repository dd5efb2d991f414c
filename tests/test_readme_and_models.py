"""The bundled models are what the documentation says (their examples run in tests/test_docs.py)."""

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import lrp_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_digits():
    """The training scripts' held-out split (seeded, stratified 25 %)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    _, x_test, _, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_test, y_test


@pytest.mark.parametrize("name,input_name,flat", [("digits_cnn", "image", False), ("digits_mlp", "features", True),
                                                   ("digits_vit", "image", False)])
def test_bundled_models_accuracy_and_explanations(name, input_name, flat):
    """Held-out accuracy from the committed ONNX file itself (nothing is retrained), and finite relevance."""
    x_test, y_test = held_out_digits()
    x = x_test.reshape(len(x_test), -1) if flat else x_test
    path = os.path.join(ROOT, "models", f"{name}.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    scores = session.run(None, {input_name: x})[-1]  # the MLP's outputs are (label, probabilities)
    assert (scores.argmax(1) == y_test).mean() >= 0.97
    assert os.path.getsize(path) < 400_000
    outputs, relevance = lrp_onnx.Explainer(path, composite="epsilon-plus-flat").explain(x[:50])
    assert np.isfinite(relevance).all() and relevance.shape == x[:50].shape


def test_bundled_text_classifier_accuracy_and_explanation():
    """The sentiment BERT on its held-out generated sentences (split() of the training script, which
    needs no training), and its explanation through the tokenizer beside it."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "models"))
    from train_sentiment_bert import LABELS, split
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(ROOT, "models", "sentiment_tokenizer.json"))
    _, test = split()
    session = ort.InferenceSession(os.path.join(ROOT, "models", "sentiment_bert.onnx"),
                                   providers=["CPUExecutionProvider"])
    right = 0
    for text, label in test:
        ids = np.array([tokenizer.encode(text).ids])
        right += session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].argmax() == label
    assert right / len(test) >= 0.97
    assert open(os.path.join(ROOT, "models", "sentiment_labels.txt")).read().split() == LABELS
    explainer = lrp_onnx.Explainer(os.path.join(ROOT, "models", "sentiment_bert.onnx"), composite="attnlrp")
    (e,) = explainer.explain_text("a dull film", tokenizer)
    assert e.tokens == ["[CLS]", "a", "dull", "film", "[SEP]"] and np.isfinite(e.relevance).all()


def exact_int8(name):
    """Whether ONNX Runtime computes this model's int8 products exactly here, as when the accuracies were
    recorded. Without VNNI, its u8s8 convolutions add pairs of products in int16 with saturation
    (vpmaddubsw), which the full-range int8 weights of the bundled int8 models overflow: on an
    AVX2-only AMD EPYC they scored 0.996 and 0.974 on clean images, against 0.998 and 0.987."""
    if ".int8" not in name:
        return True
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.mark.parametrize("name", ["shapes_cnn", "shapes_cnn_shortcut", "shapes_vit", "shapes_vit_shortcut",
                                  "shapes_cnn.int8", "shapes_cnn_shortcut.int8", "shapes_cnn.fp16",
                                  "shapes_cnn_shortcut.fp16"])
def test_bundled_shapes_models_score_as_recorded(name):
    """The committed synthetic-shapes models reproduce models/shapes_accuracy.json on the test splits
    (regenerated from their seed), and only the shortcut models fail where the watermark moved."""
    import json
    import sys
    sys.path.insert(0, os.path.join(ROOT, "models"))
    import synthetic_shapes as shapes
    from train_shapes_cnn import TEST_COUNT, TEST_SEED, as_input
    recorded = json.load(open(os.path.join(ROOT, "models", "shapes_accuracy.json")))[name]
    session = ort.InferenceSession(os.path.join(ROOT, "models", f"{name}.onnx"), providers=["CPUExecutionProvider"])
    for split, watermark in (("clean", None), ("swapped", "swapped")):
        data = shapes.generate(TEST_COUNT, TEST_SEED, watermark=watermark)
        accuracy = (session.run(None, {"image": as_input(data.images)})[0].argmax(1) == data.labels).mean()
        assert accuracy == pytest.approx(recorded[split], abs=0.002 if exact_int8(name) else 0.02), split
    # a shortcut model also misses the unmarked images of its shortcut class, so only the clean
    # models are held to 90 % on clean images
    shortcut = name.split(".")[0].endswith("_shortcut")
    assert shortcut or recorded["clean"] >= 0.9
    assert (recorded["clean"] - recorded["swapped"] > 0.2) == shortcut


def test_cli_compares_a_model_with_its_int8_form(tmp_path):
    """``lrp-onnx compare model.onnx model.int8.onnx``: does quantization change what the model looks at?
    On the bundled shapes CNN, the int8 form predicts the same classes with relevance close to the
    float model's (EVALUATION.md, "Deployed forms", measures it on 200 images)."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "models"))
    import synthetic_shapes as shapes
    from train_shapes_cnn import TEST_SEED, as_input
    data = tmp_path / "shapes.npy"
    np.save(data, as_input(shapes.generate(16, TEST_SEED).images))
    out = tmp_path / "compare"
    models = [os.path.join(ROOT, "models", name) for name in ("shapes_cnn.onnx", "shapes_cnn.int8.onnx")]
    result = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "compare", *models, str(data), "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.load(open(out / "compare.json"))["inputs"]
    assert len(rows) == 16 and all(a == b for a, b in (r["predicted"] for r in rows))
    assert np.mean([r["pearson"] for r in rows]) > 0.9

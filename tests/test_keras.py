"""Keras-made classifiers: Keras 3 on TensorFlow, channels_last (NHWC) input, dynamic batch, exported
by ``model.export(format="onnx")`` and by tf2onnx directly. Each converts, reproduces the model,
conserves relevance under ε, explains any batch size, and explains exactly as the same network
built in PyTorch (NCHW) with the same weights."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

import torch  # noqa: E402

import exporters  # noqa: E402
# torchvision (through zennit_reference) loads triton's C extension, which crashes the process if
# TensorFlow was imported first: the PyTorch side comes first.
from zennit_reference import export as torch_export  # noqa: E402

from conftest import extra_module  # noqa: E402

tf = extra_module("tensorflow")
keras = extra_module("keras")
tf2onnx = extra_module("tf2onnx")

import lrp_onnx  # noqa: E402
from lrp_onnx.verify import verify  # noqa: E402

L = keras.layers
IMAGE = (16, 16, 3)
TINY_EPSILON = {"epsilon": 1e-9, "stabilizer": 1e-9}  # ε-rule conserves up to rounding


def cnn(head):
    """Conv+ReLU, max pooling, Conv+ReLU, then global average pooling or Flatten, and a Dense layer."""
    inputs = keras.Input(IMAGE)
    x = L.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = L.MaxPooling2D(2)(x)
    if head == "gap":
        x = L.Conv2D(8, 3, activation="relu")(x)
        x = L.GlobalAveragePooling2D()(x)
    else:  # a strided SAME conv (asymmetric pads), then Keras' NHWC flatten: Transpose + Shape-computed Reshape
        x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
        x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(5)(x))


def mlp():
    inputs = keras.Input((20,))
    x = L.Dense(16, activation="relu")(inputs)
    x = L.Dense(12, activation="relu")(x)
    return keras.Model(inputs, L.Dense(4)(x))


def many_layers():
    """More of Keras: Rescaling, BatchNormalization (folded into the conv by tf2onnx), depthwise conv,
    Add, average pooling, Concatenate, Dropout, a softmax head. Biases stay zero (Keras' init) and
    BatchNorm has zero mean and shift, so the ε-rule must conserve relevance exactly."""
    inputs = keras.Input(IMAGE)
    x = L.Rescaling(0.5, offset=0.25)(inputs)
    x = L.Conv2D(6, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    x = L.Add()([x, L.DepthwiseConv2D(3, padding="same", activation="relu")(x)])
    x = L.AveragePooling2D(2)(x)
    x = L.Concatenate()([x, L.Conv2D(4, 1, activation="relu")(x)])
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Dropout(0.2)(L.Flatten()(x))
    x = L.Dense(10, activation="relu")(x)
    return keras.Model(inputs, L.Dense(5, activation="softmax")(x))


def build(name):
    keras.utils.set_random_seed(0)
    model = {"cnn-gap": lambda: cnn("gap"), "cnn-flatten": lambda: cnn("flatten"), "mlp": mlp,
             "many-layers": many_layers}[name]()
    model(np.zeros((1,) + model.input_shape[1:], np.float32))  # Keras export needs a called model
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
        elif getattr(layer, "bias", None) is not None and name != "many-layers":
            # Non-zero biases: a zero bias would be dropped by the exporter, and the bias Add not exercised.
            layer.bias.assign(rng.uniform(-0.3, 0.3, layer.bias.shape))
    return model


def export_keras(model, path):
    model.export(str(path), format="onnx", verbose=False)


def export_tf2onnx(model, path):
    spec = tf.TensorSpec((None,) + model.input_shape[1:], tf.float32, name="input")
    tf2onnx.convert.from_keras(model, input_signature=[spec], opset=17, output_path=str(path))


EXPORTERS = {"keras": export_keras, "tf2onnx": export_tf2onnx}
MODELS = exporters.KERAS_MODELS


@pytest.fixture(scope="module")
def keras_models():
    return {name: build(name) for name in MODELS}


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in EXPORTERS], ids="-".join)
def exported(request, keras_models, tmp_path_factory):
    """(Keras model, ONNX path, input name, a batch of 3 inputs in [0, 1))."""
    name, exporter = request.param
    model = keras_models[name]
    path = tmp_path_factory.mktemp("keras") / f"{name}-{exporter}.onnx"
    EXPORTERS[exporter](model, path)
    input_name = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    x = np.random.default_rng(0).uniform(0, 1, (3,) + model.input_shape[1:]).astype(np.float32)
    return model, str(path), input_name, x


def test_onnx_export_matches_keras(exported):
    model, path, input_name, x = exported
    (y,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {input_name: x})
    expected = model(x).numpy()
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("composite,params", [("epsilon-plus-flat", {}), ("alpha-beta", {}),
                                              ("epsilon", TINY_EPSILON)], ids=["epsilon-plus-flat", "alpha-beta",
                                                                               "epsilon"])
def test_verify(exported, composite, params):
    """The explainer reproduces the outputs, relevance is finite, and under ε with the biases left
    out of the rules (Zennit's zero_params) Σ relevance is the explained logit."""
    _, path, input_name, x = exported
    result = verify(path, composite, feeds={input_name: x}, zero_params=["bias"], **params)
    assert result.output_deviation <= 1e-5
    assert result.finite
    if composite == "epsilon":
        assert result.conservation_error <= 1e-4


def test_any_batch_size(exported):
    """One explainer, symbolic batch: batch 7 and batch 1 run, and a sample's relevance does not
    depend on the rest of its batch."""
    _, path, input_name, x = exported
    explainer = lrp_onnx.Explainer(path, composite="epsilon-plus-flat")
    batch = np.random.default_rng(2).uniform(0, 1, (7,) + x.shape[1:]).astype(np.float32)
    _, relevance = explainer.explain(batch)
    _, first = explainer.explain(batch[:1])
    assert relevance.shape == batch.shape and first.shape == (1,) + x.shape[1:]
    np.testing.assert_allclose(first, relevance[:1], rtol=1e-5, atol=1e-6 * np.abs(relevance).max())


# --- the same network in PyTorch, weights copied across ------------------------------------------

def torch_twin(model, head):
    """``cnn(head)`` in PyTorch (NCHW) with the Keras weights: kernels HWIO -> OIHW, dense kernels
    transposed; after Flatten the dense rows are reordered from Keras' (h, w, c) to torch's (c, h, w)."""
    from torch import nn
    conv1, conv2, dense = [layer for layer in model.layers if layer.get_weights()]
    c2 = nn.Conv2d(6, 8, 3) if head == "gap" else nn.Conv2d(6, 8, 3, stride=2)
    # Keras' SAME padding of a strided conv pads at the bottom and right only.
    same = [] if head == "gap" else [nn.ZeroPad2d((0, 1, 0, 1))]
    tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if head == "gap" else [nn.Flatten()]
    twin = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *same, c2, nn.ReLU(), *tail,
                         nn.Linear(dense.get_weights()[0].shape[0], 5)).eval()
    kernel, bias = dense.get_weights()
    if head != "gap":
        h, w, c = model.layers[-2].input.shape[1:]
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    with torch.no_grad():
        for module, layer in ((twin[0], conv1), (c2, conv2)):
            k, b = layer.get_weights()
            module.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            module.bias.copy_(torch.from_numpy(b))
        twin[-1].weight.copy_(torch.from_numpy(kernel.T.copy()))
        twin[-1].bias.copy_(torch.from_numpy(bias))
    return twin


@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_keras_and_torch_explain_alike(keras_models, tmp_path, head):
    """NHWC Keras and NCHW PyTorch, same weights: same outputs, and the same relevance once the
    Keras relevance is transposed to NCHW, under alpha-beta and epsilon-plus-flat."""
    model = keras_models[f"cnn-{head}"]
    keras_path = tmp_path / "keras.onnx"
    export_keras(model, keras_path)
    x = np.random.default_rng(3).uniform(0, 1, (4,) + IMAGE).astype(np.float32)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    torch_path = torch_export(torch_twin(model, head), torch.from_numpy(x_nchw), str(tmp_path / "torch.onnx"),
                              dynamo=False)
    for composite in ("alpha-beta", "epsilon-plus-flat"):
        keras_out, keras_rel = lrp_onnx.Explainer(str(keras_path), composite=composite).explain(x)
        torch_out, torch_rel = lrp_onnx.Explainer(torch_path, composite=composite).explain(x_nchw)
        (keras_y,), torch_y = keras_out.values(), torch_out["logits"]
        np.testing.assert_allclose(keras_y, torch_y, rtol=1e-5, atol=1e-5 * np.abs(torch_y).max())
        keras_rel = keras_rel.transpose(0, 3, 1, 2)
        for k, t in zip(keras_rel, torch_rel):
            assert np.linalg.norm(k - t) <= 1e-4 * np.linalg.norm(t), composite

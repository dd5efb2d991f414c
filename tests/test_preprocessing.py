"""Preprocessing inside the graph: a uint8 NHWC image input that the model casts, scales,
normalises and transposes itself is explained at that input, relevance in its layout; ``--input``
may name a float tensor inside the graph instead. The reference is Zennit's relevance at the
normalised NCHW tensor of the same torch network."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import AlphaBeta

import lrp_onnx
from conftest import small_cnn
from test_cli import cli

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


class Pixels(nn.Module):
    """uint8 [N, H, W, 3] → float, /255, normalised, → NCHW → the CNN: preprocessing in the graph."""

    def __init__(self, cnn):
        super().__init__()
        self.cnn = cnn

    def normalised(self, pixels):
        x = (pixels.float() / 255.0 - MEAN) / STD
        return x.permute(0, 3, 1, 2)

    def forward(self, pixels):
        return self.cnn(self.normalised(pixels))


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    model = Pixels(small_cnn()).eval()
    path = tmp_path_factory.mktemp("pixels") / "pixels.onnx"
    pixels = torch.randint(0, 256, (2, 12, 12, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (pixels,), str(path), dynamo=False, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}})
    return model, str(path), pixels.numpy()


def zennit_at_normalised(model, pixels, targets):
    """Zennit's alpha-beta relevance at the normalised NCHW tensor, moved back to NHWC."""
    x = model.normalised(torch.as_tensor(pixels))
    composite = LayerMapComposite(layer_map_base() + [(nn.Conv2d, AlphaBeta()), (nn.Linear, AlphaBeta())],
                                  canonizers=[SequentialMergeBatchNorm()])
    onehot = torch.nn.functional.one_hot(torch.as_tensor(targets), 5).float()
    with Gradient(model=model.cnn, composite=composite) as attributor:
        _, relevance = attributor(x, lambda out: out * onehot)
    return relevance.detach().numpy()


def test_a_uint8_image_input_is_explained_at_itself_in_its_layout(pixel_model):
    model, path, pixels = pixel_model
    p = lrp_onnx.plan(path)
    assert p.explained_input.name == "pixels" and p.explained is p.explained_input
    explainer = lrp_onnx.Explainer(path)
    outputs, relevance = explainer.explain(pixels)
    assert relevance.shape == pixels.shape and relevance.dtype == np.float32  # NHWC, like the input
    targets = outputs["logits"].argmax(axis=1)
    expected = zennit_at_normalised(model, pixels, targets).transpose(0, 2, 3, 1)
    errors = np.linalg.norm((relevance - expected).reshape(2, -1), axis=1) / \
        np.linalg.norm(expected.reshape(2, -1), axis=1)
    assert errors.max() <= 1e-5, errors


def test_input_may_name_a_float_tensor_inside_the_graph(pixel_model, tmp_path):
    model, path, pixels = pixel_model
    inner = next(n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Transpose")
    p = lrp_onnx.plan(path, input_name=inner)
    assert p.explained_input.name == "pixels" and p.explained.name == inner
    explainer = lrp_onnx.Explainer(lrp_onnx.convert(path, input_name=inner))
    outputs, relevance = explainer.explain(pixels)
    assert relevance.shape == (2, 3, 12, 12)
    expected = zennit_at_normalised(model, pixels, outputs["logits"].argmax(axis=1))
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    result = cli("inspect", path, "--input", inner)
    assert result.returncode == 0 and f"at tensor {inner!r} [" in result.stdout, result.stdout + result.stderr
    result = cli("convert", path, "--input", "no_such_tensor", "-o", tmp_path / "e.lrp.onnx")
    assert result.returncode == 5 and "names no graph input and no tensor of the graph" in result.stderr


def test_cli_explains_png_files_as_raw_pixels(pixel_model, tmp_path):
    """The images are read as the model takes them: 8-bit values, no scaling (the graph has it);
    --mean, --std and --scale, which would scale them twice, are refused."""
    _, path, pixels = pixel_model
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(pixels[k]).save(folder / f"{k}.png")
    result = cli("explain", path, folder, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    shard = next((tmp_path / "out" / "relevance").glob("*.npy"))
    relevance = np.load(shard)
    _, expected = lrp_onnx.Explainer(path).explain(pixels)
    np.testing.assert_allclose(relevance, expected, rtol=1e-6, atol=1e-7)
    assert len(list((tmp_path / "out").glob("*_class*.png"))) == 2  # a heatmap per image
    refused = cli("explain", path, folder, "-o", tmp_path / "out2", "--mean", "0.5")
    assert refused.returncode == 2 and "scales them itself" in refused.stderr

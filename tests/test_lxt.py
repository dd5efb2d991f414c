"""Parity with LXT 2.1 (AttnLRP's reference implementation), which runs in its own process
(lxt_reference.py): a small torchvision VisionTransformer under CP-LRP (LXT's default for it)
and AttnLRP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

import lrp_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
       "num_classes": 5}
TOLERANCE = 1e-4  # relative L2 per sample, float32


def small_vit():
    torch.manual_seed(0)
    model = VisionTransformer(**VIT).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model


def lxt_relevance(composite, model, x, targets, folder):
    paths = {name: os.path.join(folder, name) for name in ("config.json", "state.pt", "x.npy", "t.npy", "r.npy")}
    json.dump(VIT, open(paths["config.json"], "w"))
    torch.save(model.state_dict(), paths["state.pt"])
    np.save(paths["x.npy"], x)
    np.save(paths["t.npy"], targets)
    subprocess.run([sys.executable, os.path.join(HERE, "lxt_reference.py"), composite, *paths.values()],
                   check=True, capture_output=True)
    return np.load(paths["r.npy"])


@pytest.mark.parametrize("composite", ["cp-lrp", "attnlrp"])
def test_matches_lxt_on_a_small_vit(tmp_path, composite):
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = np.array([1, 3])
    reference = lxt_relevance(composite, model, x.numpy(), targets, str(tmp_path))
    path = str(tmp_path / "vit.onnx")
    torch.onnx.export(model, x, path, input_names=["x"], output_names=["y"], dynamo=True)
    _, ours = lrp_onnx.Explainer(path, composite=composite).explain(x.numpy(), targets)
    errors = np.linalg.norm((ours - reference).reshape(2, -1), axis=1) / np.linalg.norm(reference.reshape(2, -1), axis=1)
    assert errors.max() <= TOLERANCE, errors


def test_cp_lrp_conserves_on_a_vit_without_biases_and_position_embedding(tmp_path):
    model = small_vit()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        model.encoder.pos_embedding.zero_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "vit.onnx")
    torch.onnx.export(model, x, path, input_names=["x"], output_names=["y"], dynamo=True)
    run = lrp_onnx.Explainer(path, composite="cp-lrp").run(x.numpy(), [0, 4])
    np.testing.assert_allclose(run["relevance"].reshape(2, -1).sum(1), run["explained_logit"], rtol=1e-5)

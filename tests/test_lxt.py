"""Parity with LXT 2.1 (AttnLRP's reference implementation), which runs in its own process
(lxt_reference.py): a small torchvision VisionTransformer under CP-LRP (LXT's default for it)
and AttnLRP, and a tiny BERT with a padded sequence under AttnLRP (LXT's map for BERT)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

import exporters
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


def lxt_relevance(family, composite, config, model, inputs, targets, folder):
    """LXT's relevance (lxt_reference.py) for ``model`` built from ``config``, on ``inputs`` {name: array}."""
    paths = {name: os.path.join(folder, name) for name in ("config.json", "state.pt", "inputs.npz", "t.npy", "r.npy")}
    json.dump(config, open(paths["config.json"], "w"))
    torch.save(model.state_dict(), paths["state.pt"])
    np.savez(paths["inputs.npz"], **inputs)
    np.save(paths["t.npy"], targets)
    subprocess.run([sys.executable, os.path.join(HERE, "lxt_reference.py"), family, composite, *paths.values()],
                   check=True, capture_output=True)
    return np.load(paths["r.npy"])


def relative_errors(ours, reference):
    n = len(reference)
    return np.linalg.norm((ours - reference).reshape(n, -1), axis=1) / np.linalg.norm(reference.reshape(n, -1), axis=1)


# TorchScript at opset 14 decomposes LayerNorm (ReduceMean, Sub, Pow, Sqrt, Div)
@pytest.mark.parametrize("exporter,opset", [("dynamo", None), ("torchscript", None), ("torchscript", 14)],
                         ids=["dynamo", "torchscript", "torchscript-opset14"])
@pytest.mark.parametrize("composite", ["cp-lrp", "attnlrp"])
def test_matches_lxt_on_a_small_vit(tmp_path, composite, exporter, opset):
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = np.array([1, 3])
    reference = lxt_relevance("vit", composite, VIT, model, {"x": x.numpy()}, targets, str(tmp_path))
    path = str(tmp_path / "vit.onnx")
    exporters.export_torch(model, x, path, exporter, opset)
    _, ours = lrp_onnx.Explainer(path, composite=composite).explain(x.numpy(), targets)
    errors = relative_errors(ours, reference)
    print(f"ViT {exporter} opset {opset} {composite}: relative L2 per sample {errors}")
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


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_matches_lxt_on_a_tiny_bert_with_padding(tmp_path, exporter):
    model, feeds, targets = exporters.hf_text_model("bert"), exporters.padded_tokens(), np.array([2, 1])
    reference = lxt_relevance("bert", "attnlrp", exporters.hf_text_config("bert"), model, feeds, targets,
                              str(tmp_path))
    path = str(tmp_path / "bert.onnx")
    exporters.export_text(model, feeds, path, exporter)
    ours = lrp_onnx.Explainer(path, composite="attnlrp").run(feeds, targets)["relevance"]
    assert ours.shape == (2, 7)
    errors = relative_errors(ours, reference)
    print(f"BERT {exporter}: relative L2 per sample {errors}")
    assert errors.max() <= TOLERANCE, errors
    assert np.all(ours[1, 4:] == 0)  # padded tokens


def test_cp_lrp_conserves_on_a_bert_without_biases_and_position_embeddings(tmp_path):
    model, feeds = exporters.hf_text_model("bert"), exporters.padded_tokens()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                parameter.zero_()
    path = str(tmp_path / "bert.onnx")
    exporters.export_text(model, feeds, path, "dynamo")
    run = lrp_onnx.Explainer(path, composite="cp-lrp").run(feeds, [0, 2])
    np.testing.assert_allclose(run["relevance"].sum(1), run["explained_logit"], rtol=1e-5)
    assert np.all(run["relevance"][1, 4:] == 0)

"""Zennit references for the parity tests and the parity benchmark: torchvision models, both
torch.onnx exporters, and Zennit composites equal to ours."""

import warnings

import numpy as np
import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite,
                               layer_map_base)
from zennit.rules import AlphaBeta, Epsilon, ZPlus
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

LOW, HIGH = -2.5, 2.5  # zbox bounds used by the parity tests


def torchvision_model(name, size, seed=0, keep_head=False):
    """A random-init torchvision classifier in eval mode.

    Below 224 px, VGG's AdaptiveAvgPool2d(7) would upsample a 1x1 map (which the TorchScript exporter
    refuses), so small VGGs pool to 1x1 and their first dense layer takes 512 features instead,
    unless ``keep_head`` (the dynamo exporter writes the upsampling as index arithmetic and GatherND).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vgg") and size < 224 and not keep_head:
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier[0] = torch.nn.Linear(512, 4096)
    model.eval()
    # Random BatchNorm statistics, so that merging BN into the convolution is exercised for real.
    # eps moves into running_var (the same function): Zennit's MergeBatchNorm leaves eps in the BN it
    # turns into an "identity", which then scales by (1 + eps)^-1/2 ≈ 1 - 5e-6 per layer, a drift
    # of ~2.5e-4 over ResNet50's depth that is Zennit's artefact, not LRP.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5).add_(module.eps)
                module.eps = 0.0
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def export(model, x, path, dynamo):
    """Export with a symbolic batch dimension, by the TorchScript (dynamo=False) or dynamo exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def canonizers(name):
    return [ResNetCanonizer()] if name.startswith("resnet") else [VGGCanonizer()]


def zennit_composite(composite, model_name, stabilizer=1e-6, eps=1e-6, zero_params=None):
    """The Zennit composite equal to lrp-onnx's composite of the same name."""
    c = canonizers(model_name)
    same_rule_everywhere = {"alpha-beta": AlphaBeta(2.0, 1.0, stabilizer, zero_params=zero_params),
                            "epsilon": Epsilon(eps, zero_params=zero_params),
                            "zplus": ZPlus(stabilizer, zero_params=zero_params)}
    if composite in same_rule_everywhere:
        rule = same_rule_everywhere[composite]
        return LayerMapComposite(layer_map_base(stabilizer) + [(Convolution, rule), (torch.nn.Linear, rule)],
                                 canonizers=c)
    if composite == "epsilon-alpha2-beta1":
        return EpsilonAlpha2Beta1(canonizers=c, zero_params=zero_params)
    if composite == "epsilon-plus-flat":
        return EpsilonPlusFlat(canonizers=c, zero_params=zero_params)
    if composite == "epsilon-gamma-box":
        return EpsilonGammaBox(low=torch.tensor(LOW), high=torch.tensor(HIGH), canonizers=c, zero_params=zero_params)
    raise KeyError(composite)


def zennit_relevance(model, x, targets, composite):
    """Zennit's relevance, seeded with logit x one-hot(target) through the attribution callable."""
    x = torch.as_tensor(x)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(targets), 1000).float()
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, lambda out: out * onehot)
    return relevance.detach().numpy()


def our_params(composite):
    return {"low": LOW, "high": HIGH} if composite == "epsilon-gamma-box" else {}


def relative_errors(ours, reference):
    """Per-sample relative L2 error ||ours - ref|| / ||ref||."""
    diff = (ours - reference).reshape(len(ours), -1)
    return np.linalg.norm(diff, axis=1) / np.linalg.norm(reference.reshape(len(ours), -1), axis=1)


def distinct_targets(logits):
    """Sample 0 explains its top class, sample 1 its runner-up (or third, to keep the targets different)."""
    first = int(np.argsort(logits[0])[-1])
    ranked = [int(c) for c in np.argsort(logits[1])[::-1][1:]]
    return np.array([first, next(c for c in ranked if c != first)])


def parity_errors(model_name, size, composites, exporters, workdir, epsilon=1e-6, zero_params=None, keep_head=False):
    """{(exporter, composite): per-sample relative L2 error of lrp-onnx against Zennit}."""
    import os

    import lrp_onnx
    model = torchvision_model(model_name, size, keep_head=keep_head)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = distinct_targets(model(x).numpy())
    references = {c: zennit_relevance(model, x, targets,
                                      zennit_composite(c, model_name, eps=epsilon, zero_params=zero_params))
                  for c in composites}
    errors = {}
    for exporter in exporters:
        path = export(model, x, os.path.join(workdir, f"{model_name}-{exporter}.onnx"), exporter == "dynamo")
        for c in composites:
            params = dict(our_params(c), **({"epsilon": epsilon} if c == "epsilon" else {}),
                          **({"zero_params": zero_params} if zero_params else {}))
            _, relevance = lrp_onnx.Explainer(path, composite=c, **params).explain(x.numpy(), targets)
            errors[exporter, c] = relative_errors(relevance, references[c])
        os.remove(path)
    return errors

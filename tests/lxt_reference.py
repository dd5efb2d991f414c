"""LXT 2.1's relevance for a torchvision VisionTransformer, computed in a process of its own.

LXT's ``monkey_patch`` replaces torchvision's classes process-wide (GELU, LayerNorm and
MultiheadAttention for CP-LRP), so the reference must not share a process with the ONNX export.

    python lxt_reference.py CONFIG.json STATE.pt X.npy TARGETS.npy OUT.npy

CONFIG holds the VisionTransformer's keyword arguments; OUT gets x ⊙ ∂f_t/∂x under LXT's rules
(its efficient mode), the relevance of each sample's target logit.
"""

import json
import sys

import numpy as np
import torch

import lxt.efficient
from torchvision.models import vision_transformer


def main(config, state, x_path, targets_path, out):
    lxt.efficient.monkey_patch(vision_transformer, verbose=False)
    model = vision_transformer.VisionTransformer(**json.load(open(config))).eval()  # built after patching
    model.load_state_dict(torch.load(state))
    x = torch.tensor(np.load(x_path), requires_grad=True)
    targets = torch.tensor(np.load(targets_path))
    logits = model(x)
    logits[torch.arange(len(targets)), targets].sum().backward()
    np.save(out, (x * x.grad).detach().numpy())


if __name__ == "__main__":
    main(*sys.argv[1:6])

"""LXT 2.1's relevance for a torchvision VisionTransformer, computed in a process of its own.

LXT's ``monkey_patch`` replaces torchvision's classes process-wide (GELU, LayerNorm and
MultiheadAttention), so the reference must not share a process with the ONNX export.

    python lxt_reference.py cp-lrp|attnlrp CONFIG.json STATE.pt X.npy TARGETS.npy OUT.npy

CONFIG holds the VisionTransformer's keyword arguments; OUT gets x ⊙ ∂f_t/∂x under LXT's rules
(its efficient mode), the relevance of each sample's target logit. ``cp-lrp`` is LXT's own map
for torchvision ViT. LXT has no AttnLRP map for it, so ``attnlrp`` is built from LXT's primitives
as its Hugging Face attention patch does (``patches.wrap_attention_forward``): the gradient at
q and k is divided by 4 and at v by 2, the uniform rule of both attention products.
"""

import json
import sys
from functools import partial

import numpy as np
import torch

import lxt.efficient
from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
from lxt.efficient.rules import divide_gradient
from torchvision.models import vision_transformer


def attnlrp_attention_forward(self, query, key, value, *args, **kwargs):
    return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                                 *args, **kwargs)


ATTNLRP = {
    vision_transformer.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
    vision_transformer.nn.LayerNorm: partial(patch_method, layer_norm_forward),
    vision_transformer.nn.MultiheadAttention: partial(patch_method, attnlrp_attention_forward, keep_original=True),
}


def main(composite, config, state, x_path, targets_path, out):
    lxt.efficient.monkey_patch(vision_transformer, ATTNLRP if composite == "attnlrp" else None, verbose=False)
    model = vision_transformer.VisionTransformer(**json.load(open(config))).eval()  # built after patching
    model.load_state_dict(torch.load(state))
    x = torch.tensor(np.load(x_path), requires_grad=True)
    targets = torch.tensor(np.load(targets_path))
    logits = model(x)
    logits[torch.arange(len(targets)), targets].sum().backward()
    np.save(out, (x * x.grad).detach().numpy())


if __name__ == "__main__":
    main(*sys.argv[1:7])

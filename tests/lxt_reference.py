"""LXT 2.1's relevance for a torchvision VisionTransformer or a Hugging Face BERT classifier,
computed in a process of its own.

LXT's ``monkey_patch`` replaces classes process-wide (torchvision's GELU, LayerNorm and
MultiheadAttention; transformers' whole BERT module), so the reference must not share a process
with the ONNX export.

    python lxt_reference.py vit cp-lrp|attnlrp CONFIG.json STATE.pt INPUTS.npz TARGETS.npy OUT.npy
    python lxt_reference.py bert attnlrp CONFIG.json STATE.pt INPUTS.npz TARGETS.npy OUT.npy

CONFIG holds the model's keyword arguments (the VisionTransformer's, or a BertConfig's). INPUTS
holds ``x`` for the ViT, ``input_ids`` and ``attention_mask`` for BERT. OUT gets the relevance of
each sample's target logit under LXT's rules (its efficient mode): x ⊙ ∂f_t/∂x for the ViT, and for
BERT Σ_D e ⊙ ∂f_t/∂e at the word embeddings e, one value per token, as LXT explains text.

``cp-lrp`` is LXT's own map for torchvision ViT, and ``attnlrp`` its map for BERT. LXT has no
AttnLRP map for torchvision ViT, so that one is built from LXT's primitives as its Hugging Face
attention patch does (``patches.wrap_attention_forward``): the gradient at q and k is divided by
4 and at v by 2, the uniform rule of both attention products.
"""

import json
import sys
from functools import partial

import numpy as np
import torch

import lxt.efficient
from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
from lxt.efficient.rules import divide_gradient


def attnlrp_attention_forward(self, query, key, value, *args, **kwargs):
    return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                                 *args, **kwargs)


def vit_model(composite, config, state):
    from torchvision.models import vision_transformer
    attnlrp = {
        vision_transformer.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
        vision_transformer.nn.LayerNorm: partial(patch_method, layer_norm_forward),
        vision_transformer.nn.MultiheadAttention: partial(patch_method, attnlrp_attention_forward, keep_original=True),
    }
    lxt.efficient.monkey_patch(vision_transformer, attnlrp if composite == "attnlrp" else None, verbose=False)
    model = vision_transformer.VisionTransformer(**config).eval()  # built after patching
    model.load_state_dict(state)
    return model


def vit_relevance(model, inputs, targets):
    x = torch.tensor(inputs["x"], requires_grad=True)
    logits = model(x)
    logits[torch.arange(len(targets)), targets].sum().backward()
    return (x * x.grad).detach().numpy()


def bert_model(composite, config, state):
    if composite != "attnlrp":
        raise SystemExit("LXT's BERT map is AttnLRP's")
    import transformers.models.bert.modeling_bert as modeling_bert
    lxt.efficient.monkey_patch(modeling_bert, verbose=False)
    model = modeling_bert.BertForSequenceClassification(modeling_bert.BertConfig(**config)).eval()
    model.load_state_dict(state)
    return model


def bert_relevance(model, inputs, targets):
    embeddings = model.bert.embeddings.word_embeddings(torch.tensor(inputs["input_ids"])).detach().requires_grad_()
    logits = model(inputs_embeds=embeddings, attention_mask=torch.tensor(inputs["attention_mask"])).logits
    logits[torch.arange(len(targets)), targets].sum().backward()
    return (embeddings * embeddings.grad).sum(-1).detach().numpy()


# family: (build the patched model from (composite, config, state dict), relevance of (model, inputs, targets))
FAMILIES = {"vit": (vit_model, vit_relevance), "bert": (bert_model, bert_relevance)}


def load(family, composite, config, state, inputs, targets):
    """The patched model, and the arguments of its relevance function, from the files."""
    build, _ = FAMILIES[family]
    model = build(composite, json.load(open(config)), torch.load(state))
    return model, dict(np.load(inputs)), torch.tensor(np.load(targets))


def main(family, composite, config, state, inputs, targets, out):
    model, inputs, targets = load(family, composite, config, state, inputs, targets)
    np.save(out, FAMILIES[family][1](model, inputs, targets))


if __name__ == "__main__":
    main(*sys.argv[1:8])

"""Slow, simple numpy re-derivations of the LRP rules, independent of the converter.

A linear layer is turned into its dense matrix M (z = M x + b for one sample) by probing a
numpy forward with basis vectors. The rules are then written in the contribution form of the
papers, c_ji = M_ji · x_i, not in the four-term form the converter emits, so the two
derivations only agree if the algebra in ``rules.py`` is right.
"""

import itertools

import numpy as np


def dense_matrix(forward, in_shape):
    """M with forward(x)[j] = Σ_i M[j, i] x[i] for one sample of shape ``in_shape`` (forward linear)."""
    size = int(np.prod(in_shape))
    columns = [forward(np.eye(size)[i].reshape(in_shape)).reshape(-1) for i in range(size)]
    return np.stack(columns, axis=1)


def conv(x, w, strides=None, pads=None, dilations=None, group=1):
    """Direct N-d convolution of one sample x [C, *S] with w [M, C/group, *K], ONNX semantics."""
    spatial = w.ndim - 2
    strides = strides or [1] * spatial
    dilations = dilations or [1] * spatial
    pads = pads or [0] * 2 * spatial
    xp = np.pad(x, [(0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    out_size = [(xp.shape[1 + i] - (w.shape[2 + i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial)]
    m_per_group, c_per_group = w.shape[0] // group, w.shape[1]
    y = np.zeros([w.shape[0]] + out_size)
    for m in range(w.shape[0]):
        g = m // m_per_group
        for o in itertools.product(*[range(n) for n in out_size]):
            for k in itertools.product(*[range(n) for n in w.shape[2:]]):
                pos = tuple(o[i] * strides[i] + k[i] * dilations[i] for i in range(spatial))
                y[(m,) + o] += np.dot(w[(m, slice(None)) + k], xp[(slice(g * c_per_group, (g + 1) * c_per_group),) + pos])
    return y


def conv_transpose(x, w, strides, pads, output_padding, group=1):
    """ConvTranspose of one sample, straight from the ONNX definition (scatter each input)."""
    spatial = w.ndim - 2
    c_in, m_per_group = w.shape[0], w.shape[1]
    full = [(x.shape[1 + i] - 1) * strides[i] + w.shape[2 + i] + output_padding[i] for i in range(spatial)]
    y = np.zeros([m_per_group * group] + full)
    for c in range(c_in):
        g = c // (c_in // group)
        for i in itertools.product(*[range(n) for n in x.shape[1:]]):
            for k in itertools.product(*[range(n) for n in w.shape[2:]]):
                pos = tuple(i[d] * strides[d] + k[d] for d in range(spatial))
                y[(slice(g * m_per_group, (g + 1) * m_per_group),) + pos] += x[(c,) + i] * w[(c, slice(None)) + k]
    crop = tuple(slice(pads[d], full[d] - pads[d + spatial]) for d in range(spatial))
    return y[(slice(None),) + crop]


def average_pool(x, kernel, strides, pads, count_include_pad):
    """AveragePool of one sample [C, *S]."""
    ones = np.ones((x.shape[0], 1) + tuple(kernel))
    total = conv(x, ones, strides, pads, group=x.shape[0])
    if count_include_pad:
        return total / np.prod(kernel)
    return total / conv(np.ones_like(x), ones, strides, pads, group=x.shape[0])


def max_pool_routing(x, r, kernel, strides, pads, dilations=None):
    """Winner-take-all: each output's relevance goes to its window's first maximum (row-major), summed
    over windows. Window positions outside the input (padding, ceil_mode's last windows) never win."""
    dilations = dilations or [1] * len(kernel)
    spatial = len(kernel)
    out = np.zeros_like(x)
    for c in range(x.shape[0]):
        for o in itertools.product(*[range(n) for n in r.shape[1:]]):
            best, where = -np.inf, None
            for k in itertools.product(*[range(n) for n in kernel]):
                pos = tuple(o[i] * strides[i] + k[i] * dilations[i] - pads[i] for i in range(spatial))
                if all(0 <= p < x.shape[1 + i] for i, p in enumerate(pos)) and x[(c,) + pos] > best:
                    best, where = x[(c,) + pos], pos
            out[(c,) + where] += r[(c,) + o]
    return out


def stabilize(z, epsilon):
    return z + epsilon * np.where(z >= 0, 1.0, -1.0)


def lrp(rule, params, m, x, bias, r, ones_matrix=None, low=None, high=None):
    """R_x for one sample by ``rule`` through z = m·x + bias, in contribution form c_ji = m_ji·x_i."""
    eps = params.get("stabilizer", 1e-6)
    c = m * x[None, :]
    bias = np.zeros(m.shape[0]) if bias is None else bias

    def split(contrib, denominator, relevance):
        return (contrib * (relevance / stabilize(denominator, eps))[:, None]).sum(0)

    if rule in ("epsilon", "norm"):
        eps = params.get("epsilon", eps)
        return split(c, c.sum(1) + bias, r)
    if rule in ("alpha-beta", "zplus"):
        alpha, beta = (params.get("alpha", 2.0), params.get("beta", 1.0)) if rule == "alpha-beta" else (1.0, 0.0)
        cp, cn = c.clip(min=0), c.clip(max=0)
        return alpha * split(cp, cp.sum(1) + bias.clip(min=0), r) - beta * split(cn, cn.sum(1) + bias.clip(max=0), r)
    if rule == "gamma":
        gamma = params.get("gamma", 0.25)
        z = c.sum(1) + bias
        up, down = c + gamma * c.clip(min=0), c + gamma * c.clip(max=0)
        return split(up, up.sum(1) + bias + gamma * bias.clip(min=0), r * (z > 0)) \
            + split(down, down.sum(1) + bias + gamma * bias.clip(max=0), r * (z < 0))
    if rule == "flat":
        return split(ones_matrix, ones_matrix.sum(1), r)
    if rule == "wsquare":
        return split(m ** 2, (m ** 2).sum(1) + bias ** 2, r)
    if rule == "zbox":
        cb = c - m.clip(min=0) * low[None, :] - m.clip(max=0) * high[None, :]
        return split(cb, cb.sum(1), r)
    raise KeyError(rule)


def stabilized(z, epsilon):
    return z + epsilon * np.where(z >= 0, 1.0, -1.0)


def bilinear_scores(x, r, epsilon):
    """Y = A·Bᵀ per head with A = x [H, T, D] and B = x[0] broadcast over the heads, under AttnLRP's
    uniform ε split: Z = R / (2·st(Y)), R_A = A ⊙ Z·B, R_B = B ⊙ Σ_heads Zᵀ·A, both back on x."""
    a, k = x, x[:1]
    y = a @ k.transpose(0, 2, 1)
    z = r / (2 * stabilized(y, epsilon))
    relevance = a * (z @ k)
    relevance[:1] += k * (z.transpose(0, 2, 1) @ a).sum(0, keepdims=True)
    return relevance


def self_scores(x, r, epsilon):
    """Y = A·Aᵀ per head, A = x [H, T, D], both factors the same tensor, under AttnLRP's uniform
    ε split: Z = R / (2·st(Y)), R_A = A ⊙ Z·A + A ⊙ Zᵀ·A."""
    y = x @ x.transpose(0, 2, 1)
    z = r / (2 * stabilized(y, epsilon))
    return x * (z @ x) + x * (z.transpose(0, 2, 1) @ x)


def softmax_rule(x, r, epsilon):
    """AttnLRP's softmax rule written out: R_x = x ⊙ (R' − s ⊙ Σ R') with R' = s ⊙ R / st(s) (= R up
    to ε), over the last axis; a −inf in x counts as 0."""
    s = np.exp(x - x.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    share = s * r / stabilized(s, epsilon)
    return np.where(np.isinf(x), 0.0, x) * (share - s * share.sum(-1, keepdims=True))


def centred_rule(x, r, epsilon):
    """x − mean(x) over the last axis (a decomposed LayerNorm's first step), R at it: the ε-split
    of the sum, R_x = x ⊙ R/st(c) and R_mean = −mean ⊙ R/st(c), then the mean's share back to x
    by the ε-rule of the mean, x ⊙ mean(R_mean / st(mean)) broadcast."""
    mean = x.mean(-1, keepdims=True)
    share = r / stabilized(x - mean, epsilon)
    return x * share + x * (-mean * share / stabilized(mean, epsilon)).mean(-1, keepdims=True)


def layer_norm_rule(x, y, r, scale, epsilon, axes=(-1,), eps=1e-5):
    """LXT's LayerNorm rule: σ constant, the mean not. g = γ ⊙ R / st(y);
    R_x = x ⊙ (g − mean_axes(g)) / σ, σ = √(var_axes(x) + eps)."""
    sigma = np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    g = scale * r / stabilized(y, epsilon)
    return x * (g - g.mean(axis=axes, keepdims=True)) / sigma


def group_norm_rule(x, y, r, scale, groups, epsilon, eps=1e-5):
    """layer_norm_rule per group of channels, x one sample [C, …]: the statistics over each group's
    channels and positions, γ per channel. Instance norm is the case groups = C."""
    g = np.asarray(scale).reshape([-1] + [1] * (x.ndim - 1)) * r / stabilized(y, epsilon)
    xg, gg = x.reshape(groups, -1), g.reshape(groups, -1)
    sigma = np.sqrt(xg.var(axis=1, keepdims=True) + eps)
    return (xg * (gg - gg.mean(axis=1, keepdims=True)) / sigma).reshape(x.shape)

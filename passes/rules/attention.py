"""Attention: scaled_dot_product_attention and nn.MultiheadAttention.

SDPA: q and k share the contracted head width; k and v share the key sequence; the output
takes q's leading dims and v's width. Its rewrite passes the original `scale` explicitly when
the head width shrinks (the default 1/sqrt(width) would change with it).

nn.MultiheadAttention is a leaf in torch.fx; its rule works on its parameters. Units:
the model width seen by the input projection (unified with the query/key/value inputs), the
output width (out_proj rows), position d of every q and k head (head-width pruning, q and k
together), position d of every v head (with the matching out_proj columns). The rewrite swaps
in `passes.modules.SlimMultiheadAttention`, whose widths can differ, with the original scale.
Variants it does not model (separate kdim/vdim projections, bias_k/bias_v) are pinned.
"""

from __future__ import annotations

import math

import numpy as np

from ..modules import SlimMultiheadAttention
from .base import UNKNOWN, Rule, arg, set_arg
from .elementwise import broadcast


def _sdpa(ctx, node):
    q, k, v = (ctx.labels(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    ctx.unify(q[-1], k[-1], ctx.why("attention width meets a non-channel dim"))
    ctx.unify(k[-2], v[-2], ctx.why("attention keys meet a non-channel dim"))
    ctx.reduce(0, (len(q) - 1,), "sum", q)
    ctx.reduce(1, (len(k) - 2,), "softmax", k)
    mask = ctx.labels(arg(node, 3, "attn_mask"))
    if mask is not None:
        ctx.pin_value(mask, ctx.why("attention mask"))
    shape = tuple(node.meta["tensor_meta"].shape)
    lead = broadcast(ctx, [q[:-2], k[:-2], v[:-2]], shape[:-2])
    return tuple(lead) + (q[-2], v[-1])


def _sdpa_rewrite(rctx, node):
    q = rctx.labels_of(arg(node, 0, "query"))
    if arg(node, 7, "scale") is None and rctx.count(q[-1]) != len(q[-1]):
        set_arg(node, 7, "scale", 1.0 / math.sqrt(len(q[-1])))


def _mha_parts(ctx, m):
    w = ctx.param(m, "in_proj_weight")
    h = m.num_heads
    rows = w[0].reshape(3, h, m.head_dim)
    return w, rows


def _mha(ctx, node):
    m = ctx.module(node)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return UNKNOWN.labels(ctx, node)
    q, k, v = (ctx.labels(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    w, rows = _mha_parts(ctx, m)
    b = ctx.param(m, "in_proj_bias")
    wo = ctx.tensor_labels(m.out_proj.weight)
    bo = None if m.out_proj.bias is None else ctx.tensor_labels(m.out_proj.bias)
    reason = ctx.why("attention input meets a non-channel dim")
    for x in (q, k, v):
        ctx.unify(x[-1], w[1], reason)
    for h in range(m.num_heads):
        ctx.unify(rows[0, 0].copy(), rows[0, h].copy())
        ctx.unify(rows[0, h].copy(), rows[1, h].copy())
        ctx.unify(rows[2, 0].copy(), rows[2, h].copy())
    ctx.unify(wo[1], rows[2].reshape(-1).copy())
    if b is not None:
        ctx.unify(b[0], w[0])
    if bo is not None:
        ctx.unify(bo[0], wo[0])
    ctx.mark_passive(m, "in_proj_weight", 1)
    ctx.mark_passive(None, m.out_proj.weight, 1)
    meta = node.meta["tensor_meta"]
    out = tuple(q[:-1]) + (wo[0],)
    weights = ctx.unlabeled_like(node)[1] if not hasattr(meta, "shape") and len(meta) > 1 else None
    return (out, weights)


def _mha_rewrite(rctx, node):
    m = rctx.module(node)
    if isinstance(m, SlimMultiheadAttention):  # a module called twice is replaced once
        return
    rows = rctx.cg.param_labels[f"{node.target}.in_proj_weight"][0].reshape(3, m.num_heads, m.head_dim)
    dqk, dv = rctx.count(rows[0, 0]), rctx.count(rows[2, 0])
    slim = SlimMultiheadAttention(m.in_proj_weight, m.in_proj_bias, m.out_proj, m.num_heads, dqk, dv,
                                  scale=1.0 / math.sqrt(m.head_dim), dropout=m.dropout,
                                  batch_first=m.batch_first)
    slim.train(m.training)
    rctx.replace_module(node.target, slim)


SDPA = Rule(_sdpa, _sdpa_rewrite)
MHA = Rule(_mha, _mha_rewrite)

"""Attention: scaled_dot_product_attention and nn.MultiheadAttention.

SDPA: q and k share the contracted head width; k and v share the key sequence; the output
takes q's leading dims and v's width. The query and key sequences are pinned: tokens are not
channels, even where some come from a parameter (register tokens, learned queries: the
parameter's rows joined to the sequence would otherwise be removable units, and removing
tokens is not what channel pruning is asked for). Its rewrite passes the original `scale`
explicitly when the head width shrinks (the default 1/sqrt(width) would change with it).

nn.MultiheadAttention is a leaf in torch.fx; its rule works on its parameters, and pins the
sequences as SDPA's (keys and values share theirs; its masks are pinned). Units:
the model width seen by the input projection (unified with the query/key/value inputs), the
output width (out_proj rows), position d of every q and k head (head-width pruning, q and k
together), position d of every v head (with the matching out_proj columns). The rewrite swaps
in `passes.modules.SlimMultiheadAttention`, whose widths can differ, with the original scale.
Variants it does not model (separate kdim/vdim projections, bias_k/bias_v) are pinned.

A pruned model can be pruned again: SlimMultiheadAttention and `passes.ops.window_attention`
have the same rules, with their q/k and v head widths read from the module or the keywords.

torchvision's Swin `shifted_window_attention(x, qkv_weight, proj_weight, ...)` (and the video
Swin's `shifted_window_attention_3d`, whose rewrite calls `passes.ops.window_attention_3d`) gets
the same head-width units; the model width it reads (qkv columns) and the width it writes (proj rows)
are free. Its rewrite calls `passes.ops.window_attention`, which takes the pruned head widths
and the original scale explicitly (the original derives both from the input width).
"""

from __future__ import annotations

import math

import numpy as np

from ..modules import SlimMultiheadAttention
from ..ops import window_attention, window_attention_3d
from .layers import _tensor_of
from .base import UNKNOWN, Rule, arg, set_arg
from .elementwise import broadcast


def _sdpa(ctx, node):
    q, k, v = (ctx.labels(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    ctx.unify(q[-1], k[-1], ctx.why("attention width meets a non-channel dim"))
    ctx.unify(k[-2], v[-2], ctx.why("attention keys meet a non-channel dim"))
    ctx.reduce(0, (len(q) - 1,), "sum", q)
    _pin_sequences(ctx, q[-2], k[-2])
    mask = ctx.labels(arg(node, 3, "attn_mask"))
    if mask is not None:
        ctx.pin_value(mask, ctx.why("attention mask"))
    shape = tuple(node.meta["tensor_meta"].shape)
    lead = broadcast(ctx, [q[:-2], k[:-2], v[:-2]], shape[:-2])
    return tuple(lead) + (q[-2], v[-1])


def _pin_sequences(ctx, queries, keys) -> None:
    """Tokens are not channels: the positions of the query and key sequences are pinned (only
    those that carry channel atoms, from a parameter joined to the sequence, are affected)."""
    why = ctx.why("attention sequence (tokens are not pruned)")
    ctx.pin(queries, why)
    ctx.pin(keys, why)


def _sdpa_rewrite(rctx, node):
    q = rctx.labels_of(arg(node, 0, "query"))
    if arg(node, 7, "scale") is None and rctx.count(q[-1]) != len(q[-1]):
        set_arg(node, 7, "scale", 1.0 / math.sqrt(len(q[-1])))


def _couple_heads(ctx, name, qk_rows, v_rows, out_cols):
    """qk_rows: q and k projection rows as [2, heads, qk_head_dim] atoms; v_rows: [heads,
    v_head_dim]. Position d of every q and k head is one unit (they are contracted together),
    position d of every v head another, and the output projection's columns follow v. These
    widths live inside the op: marked active."""
    heads = qk_rows.shape[1]
    ctx.mark_active(qk_rows.reshape(-1), v_rows.reshape(-1))
    ctx.mark_producer(f"{name}[q,k]", qk_rows.reshape(-1).copy())
    ctx.mark_producer(f"{name}[v]", v_rows.reshape(-1).copy())
    ctx.unify(np.tile(qk_rows[0, 0], heads), qk_rows[0].reshape(-1).copy())
    ctx.unify(qk_rows[0].reshape(-1).copy(), qk_rows[1].reshape(-1).copy())
    ctx.unify(np.tile(v_rows[0], heads), v_rows.reshape(-1).copy())
    ctx.unify(out_cols, v_rows.reshape(-1).copy())


def _split_rows(rows, heads: int, qk_head_dim: int, v_head_dim: int):
    """Fused projection rows [q | k | v] -> ([2, heads, qk_head_dim], [heads, v_head_dim])."""
    qk = heads * qk_head_dim
    return rows[:2 * qk].reshape(2, heads, qk_head_dim), rows[2 * qk:].reshape(heads, v_head_dim)


def _mha(ctx, node):
    m = ctx.module(node)
    if isinstance(m, SlimMultiheadAttention):  # an already pruned model, pruned again
        dims = (m.num_heads, m.qk_head_dim, m.v_head_dim)
    elif not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return UNKNOWN.labels(ctx, node)
    else:
        dims = (m.num_heads, m.head_dim, m.head_dim)
    node.meta["passes_heads"] = dims  # (heads, qk_head_dim, v_head_dim) before the rewrite
    q, k, v = (ctx.labels(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    # sequence dims: (N, L, E) batch first, (L, N, E) else, (L, E) unbatched
    qs, ks = (0, 0) if len(q) == 3 and not m.batch_first else (len(q) - 2, len(k) - 2)
    ctx.unify(k[ks], v[ks], ctx.why("attention keys meet a non-channel dim"))
    _pin_sequences(ctx, q[qs], k[ks])
    for i, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        ctx.pin_value(ctx.labels(arg(node, i, name)), ctx.why("attention mask"))
    w = ctx.param(m, "in_proj_weight")
    qk_rows, v_rows = _split_rows(w[0], *dims)
    b = ctx.param(m, "in_proj_bias")
    wo = ctx.tensor_labels(m.out_proj.weight)
    bo = None if m.out_proj.bias is None else ctx.tensor_labels(m.out_proj.bias)
    reason = ctx.why("attention input meets a non-channel dim")
    for x in (q, k, v):
        ctx.unify(x[-1], w[1], reason)
    _couple_heads(ctx, f"{node.target}.in_proj_weight", qk_rows, v_rows, wo[1])
    ctx.mark_passive(m, "in_proj_weight", 0)
    ctx.mark_passive(m, "in_proj_bias", 0)
    if b is not None:
        ctx.unify(b[0], w[0])
    if bo is not None:
        ctx.unify(bo[0], wo[0])
    ctx.mark_passive(m, "in_proj_weight", 1)
    ctx.mark_passive(None, m.out_proj.weight, 1)
    meta = node.meta["tensor_meta"]
    out = tuple(q[:-1]) + (wo[0],)
    weights = ctx.unlabeled_like(node)[1] if not hasattr(meta, "shape") and len(meta) > 1 else None
    if weights is not None:  # [..., L, S]: the queries and keys (heads, if not averaged, are kept)
        weights = (*weights[:-2], q[qs], k[ks])
    return (out, weights)


def _mha_rewrite(rctx, node):
    m = rctx.module(node)
    if "passes_heads" not in node.meta:  # a variant the analysis pinned: nothing changed
        return
    heads, dqk, dv = node.meta["passes_heads"]
    qk_rows, v_rows = _split_rows(rctx.cg.param_labels[f"{node.target}.in_proj_weight"][0], heads, dqk, dv)
    new_qk, new_v = rctx.count(qk_rows[0, 0]), rctx.count(v_rows[0])
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    if isinstance(m, SlimMultiheadAttention):  # pruned again, or a module called twice
        m.qk_head_dim, m.v_head_dim, m.embed_dim = new_qk, new_v, m.in_proj_weight.shape[1]
        return
    slim = SlimMultiheadAttention(m.in_proj_weight, m.in_proj_bias, m.out_proj, m.num_heads, new_qk, new_v,
                                  scale=1.0 / math.sqrt(m.head_dim), dropout=m.dropout,
                                  batch_first=m.batch_first)
    slim.train(m.training)
    rctx.replace_module(node.target, slim)


_WINDOW_ARGS = dict(x=(0, "input"), w=(1, "qkv_weight"), p=(2, "proj_weight"), bias=(3, "relative_position_bias"),
                    heads=(5, "num_heads"), qb=(9, "qkv_bias"), pb=(10, "proj_bias"), ls=(11, "logit_scale"))
_WINDOW_3D_ARGS = {k: v for k, v in _WINDOW_ARGS.items() if k != "ls"}  # no logit_scale; 11 is `training`


def _window_rule(args: dict, op) -> Rule:
    """Rule for a window attention function whose arguments sit at `args`; its rewrite calls
    `op` (passes.ops), which takes the head widths and the scale as keywords."""

    def labels(ctx, node):
        """torchvision's (shifted_)window_attention(x [B,...,C], qkv_weight, proj_weight, ...)
        derives the head width from C; passes.ops' version (a pruned Swin, pruned again) has
        it in its keywords, free of C."""
        a = {k: arg(node, i, n) for k, (i, n) in args.items()}
        a.setdefault("ls", None)
        x, w, p = ctx.labels(a["x"]), ctx.labels(a["w"]), ctx.labels(a["p"])
        heads = a["heads"]
        if not isinstance(heads, int) or heads <= 0:
            return UNKNOWN.labels(ctx, node)
        if "qk_head_dim" in node.kwargs:
            dqk, dv = node.kwargs["qk_head_dim"], node.kwargs.get("v_head_dim")
        elif len(x[-1]) % heads == 0:
            dqk = dv = len(x[-1]) // heads
        else:
            return UNKNOWN.labels(ctx, node)
        if not isinstance(dqk, int) or not isinstance(dv, int) or len(w[0]) != heads * (2 * dqk + dv):
            return UNKNOWN.labels(ctx, node)
        node.meta["passes_heads"] = (heads, dqk, dv)
        ctx.unify(x[-1], w[1], ctx.why("attention input meets a non-channel dim"))
        qk_rows, v_rows = _split_rows(w[0], heads, dqk, dv)
        _couple_heads(ctx, a["w"].target if hasattr(a["w"], "target") else "qkv_weight", qk_rows, v_rows, p[1])
        for bias, weight in (("qb", w), ("pb", p)):
            if ctx.labels(a[bias]) is not None:
                ctx.unify(ctx.labels(a[bias])[0], weight[0])
        for name in ("bias", "ls"):  # per-head tensors: heads are not pruned
            ctx.pin_value(ctx.labels(a[name]), ctx.why("per-head attention tensor"))
        ctx.mark_passive(None, _tensor_of(ctx, a["w"]), 0, 1)
        ctx.mark_passive(None, _tensor_of(ctx, a["qb"]), 0)
        ctx.mark_passive(None, _tensor_of(ctx, a["p"]), 1)
        shape = tuple(node.meta["tensor_meta"].shape)
        return tuple(np.zeros(s, dtype=np.int64) for s in shape[:-1]) + (p[0],)

    def rewrite(rctx, node):
        if "passes_heads" not in node.meta:  # a form the analysis pinned: nothing changed
            return
        heads, dqk, dv = node.meta["passes_heads"]
        qk_rows, v_rows = _split_rows(rctx.labels_of(arg(node, 1, "qkv_weight"))[0], heads, dqk, dv)
        scale = node.kwargs.get("scale", dqk ** -0.5)  # the original's, also when pruned again
        node.target = op
        node.kwargs = {**node.kwargs, "qk_head_dim": rctx.count(qk_rows[0, 0]),
                       "v_head_dim": rctx.count(v_rows[0]), "scale": scale}

    return Rule(labels, rewrite)


SDPA = Rule(_sdpa, _sdpa_rewrite)
WINDOW_ATTENTION = _window_rule(_WINDOW_ARGS, window_attention)
WINDOW_ATTENTION_3D = _window_rule(_WINDOW_3D_ARGS, window_attention_3d)
MHA = Rule(_mha, _mha_rewrite)

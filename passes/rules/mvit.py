"""torchvision MViT's fx-wrapped helpers (`torchvision.models.video.mvit`).

fx keeps these four functions as opaque call nodes; without rules they pinned every head width
of an MViT and, through the residual stream, most of the model.

- `_unsqueeze(x, target_dim, expand_dim) -> (x', x.dim())` adds a size-1 dim at `expand_dim`
  when x has `target_dim - 1` dims; `_squeeze(x, target_dim, expand_dim, tensor_dim)` removes
  it again. Labels move with the dims; which case ran is read from the traced shapes.
- `_add_shortcut(x, shortcut, residual_with_cls_embed)` adds `shortcut` into `x` in place
  (all tokens, or all but the class token): elementwise, the operands' channels coincide.
- `_add_rel_pos(attn, q, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t)` adds to the attention
  logits, in place, the contraction of q's head width with three relative-position tables
  `[positions, head_dim]`: each table's columns are q's head channels (pruned with them, so the
  rewrite has nothing to change: the function reads every size from its tensors), the table
  rows are positions and stay.
"""

from __future__ import annotations

from .. import labels as L
from .base import UNKNOWN, Rule, arg
from .elementwise import BINARY
from .layers import _tensor_of


def _unsqueeze(ctx, node):
    x = ctx.labels(arg(node, 0, "x"))
    target, expand = arg(node, 1, "target_dim"), arg(node, 2, "expand_dim")
    if not isinstance(x, tuple) or not isinstance(target, int) or not isinstance(expand, int):
        return UNKNOWN.labels(ctx, node)
    out = x
    if len(x) == target - 1:
        k = expand % (len(x) + 1)
        out = x[:k] + (L.zeros(1),) + x[k:]
    if len(node.meta["tensor_meta"][0].shape) != len(out):  # outputs (tensor, int)
        return UNKNOWN.labels(ctx, node)
    return (out, None)


def _squeeze(ctx, node):
    x = ctx.labels(arg(node, 0, "x"))
    expand = arg(node, 2, "expand_dim")
    if not isinstance(x, tuple) or not isinstance(expand, int):
        return UNKNOWN.labels(ctx, node)
    nd = len(ctx.shape(node))
    if nd == len(x):
        return x
    k = expand % len(x)
    if nd != len(x) - 1 or len(x[k]) != 1:
        return UNKNOWN.labels(ctx, node)
    return x[:k] + x[k + 1:]


def _add_rel_pos(ctx, node):
    attn, q = ctx.labels(arg(node, 0, "attn")), ctx.labels(arg(node, 1, "q"))
    tables = [arg(node, i, n) for i, n in ((4, "rel_pos_h"), (5, "rel_pos_w"), (6, "rel_pos_t"))]
    if (not isinstance(attn, tuple) or not isinstance(q, tuple) or len(q) != 4
            or any(_tensor_of(ctx, t) is None or _tensor_of(ctx, t).dim() != 2 for t in tables)):
        return UNKNOWN.labels(ctx, node)
    for t in tables:
        lab = ctx.labels(t)
        ctx.unify(q[-1], lab[1], ctx.why("relative position table width meets a non-channel dim"))
        ctx.pin(lab[0], ctx.why("relative position table rows are positions"))
        ctx.mark_passive(None, _tensor_of(ctx, t), 1)
    ctx.reduce(1, (3,), "sum", q)
    return attn


UNSQUEEZE = Rule(_unsqueeze)
SQUEEZE = Rule(_squeeze)
ADD_SHORTCUT = BINARY
ADD_REL_POS = Rule(_add_rel_pos)

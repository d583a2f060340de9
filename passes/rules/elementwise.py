"""Elementwise rules: the same position in every (broadcast) operand is the same channel.

Output dim k is unified with dim k of every operand that is not broadcast along it (numpy
alignment from the right). An operand that is a plain number leaves labels alone; a number
computed from a channel count (a `SizeVal`) multiplied into a tensor changes meaning when the
channel count shrinks, so it is pinned. On plain Python numbers (shape arithmetic such as
`C // groups`) the rule carries the channel atoms along instead.
"""

from __future__ import annotations

import numpy as np

from .. import labels as L
from ..channels import SizeVal
from .base import Rule, tensor_args


def broadcast(ctx, inputs: list, out_shape) -> tuple:
    nd = len(out_shape)
    out = []
    reason = ctx.why("elementwise with a non-channel dim")
    for lab in inputs:  # a single channel (a size-1 slice) used as an operand: cannot go
        for a in lab:
            if len(a) == 1 and a[0]:
                ctx.pin(a, ctx.why("a single channel is used as a broadcast operand"))
    for k, size in enumerate(out_shape):
        arrs = []
        for lab in inputs:
            j = k - (nd - len(lab))
            if j >= 0 and size > 1 and len(lab[j]) == size:
                arrs.append(lab[j])
        if not arrs:
            out.append(L.zeros(size))
            continue
        for a in arrs[1:]:
            ctx.unify(arrs[0], a, reason)
        out.append(arrs[0])
    return tuple(out)


def _elementwise(ctx, node):
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return broadcast(ctx, tensor_args(ctx, node), tuple(meta.shape))


def _unary(ctx, node):
    meta = node.meta.get("tensor_meta")
    first = ctx.labels(node.args[0]) if node.args else None
    if meta is None or first is None or not hasattr(meta, "shape"):
        return None
    shape = tuple(meta.shape)
    if len(first) == len(shape) and all(len(a) == n and (n > 1 or not a[0]) for a, n in zip(first, shape)):
        return tuple(a if n > 1 else L.zeros(1) for a, n in zip(first, shape))  # what broadcast returns
    return broadcast(ctx, [first], shape)


def _arith(ctx, node):
    """operator.* on tensors (elementwise) or on shape numbers (carry channel atoms)."""
    vals = [ctx.labels(a) for a in node.args]
    sizes = [v for v in vals if isinstance(v, SizeVal)]
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        for s in sizes:
            ctx.pin(s.atoms, ctx.why("a channel count is used as a number"))
        return _elementwise(ctx, node)
    if sizes:
        return SizeVal(L.unique(np.concatenate([s.atoms for s in sizes])))
    return None


UNARY = Rule(_unary)
BINARY = Rule(_elementwise)
ARITH = Rule(_arith, shape_args=True)

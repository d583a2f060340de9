"""Contractions and reductions: matmul, einsum, sum/mean/amax, softmax, F.normalize.

Contracted dims are the same channel on both sides (unified) and are recorded as a "sum"
reduction: masked equivalence holds there once removed positions are zero. A mean, max or
softmax over a channel dim is recorded with its kind: its result depends on how many channels
are left, so `verify` reports it rather than expecting exact equality.
"""

from __future__ import annotations

from .. import labels as L
from .base import UNKNOWN, Rule, arg
from .elementwise import broadcast


def _matmul(ctx, node):
    a, b = ctx.labels(node.args[0]), ctx.labels(node.args[1])
    a2 = a if len(a) > 1 else (L.zeros(1),) + tuple(a)
    b2 = b if len(b) > 1 else tuple(b) + (L.zeros(1),)
    ctx.unify(a2[-1], b2[-2], ctx.why("matmul contracts a channel with a non-channel dim"))
    ctx.reduce(0, (len(a) - 1,), "sum", a)
    ctx.reduce(1, (max(len(b) - 2, 0),), "sum", b)
    out_shape = tuple(node.meta["tensor_meta"].shape)
    batch_shape = out_shape[: len(out_shape) - (len(a) > 1) - (len(b) > 1)]
    batch = broadcast(ctx, [a2[:-2], b2[:-2]], batch_shape) if batch_shape else ()
    tail = ((a2[-2],) if len(a) > 1 else ()) + ((b2[-1],) if len(b) > 1 else ())
    return tuple(batch) + tail


def _einsum(ctx, node):
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    eq = eq.replace(" ", "")
    if "..." in eq:
        return UNKNOWN.labels(ctx, node)
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not _:
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    labs = [ctx.labels(o) for o in ops]
    by_letter: dict[str, list] = {}
    for i, (term, lab) in enumerate(zip(terms, labs)):
        for d, c in enumerate(term):
            by_letter.setdefault(c, []).append((i, d, lab[d]))
    reason = ctx.why("einsum joins a channel with a non-channel dim")
    for c, occ in by_letter.items():
        sized = [o for o in occ if len(o[2]) > 1]
        for o in sized[1:]:
            ctx.unify(sized[0][2], o[2], reason)
        if c not in rhs:
            for i, d, _lab in occ:
                ctx.reduce(i + 1, (d,), "sum", labs[i])
    shape = tuple(node.meta["tensor_meta"].shape)
    out = []
    for c, s in zip(rhs, shape):
        cands = [o[2] for o in by_letter[c] if len(o[2]) == s]
        out.append(cands[0] if cands else L.zeros(s))
    return tuple(out)


def _reduction(kind):
    def rule(ctx, node):
        x = ctx.labels(node.args[0])
        dims = arg(node, 1, "dim")
        keep = arg(node, 2, "keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            dims = tuple(range(len(x)))
        elif isinstance(dims, int):
            dims = (dims,)
        dims = {d % len(x) for d in dims}
        ctx.reduce(0, sorted(dims), kind, x)
        return tuple(L.zeros(1) if d in dims else a for d, a in enumerate(x) if keep or d not in dims)
    return rule


def _softmax(ctx, node):
    x = ctx.labels(node.args[0])
    if node.op == "call_module":
        dim = ctx.module(node).dim
    else:
        dim = arg(node, 1, "dim")
    if dim is None:
        return UNKNOWN.labels(ctx, node)
    ctx.reduce(0, (dim,), "softmax", x)
    return x


def _normalize(ctx, node):
    """F.normalize(x, p, dim): x over its p-norm along dim. For p > 0 (inf included) zeroed
    positions add nothing to the norm: a "sum" reduction, exact under masked equivalence."""
    x = ctx.labels(arg(node, 0, "input"))
    p, dim = arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1)
    if (not isinstance(x, tuple) or type(dim) is not int or not -len(x) <= dim < len(x)
            or type(p) not in (int, float) or not p > 0):
        return UNKNOWN.labels(ctx, node)
    ctx.reduce(0, (dim,), "sum", x)
    return x


MATMUL = Rule(_matmul)
NORMALIZE = Rule(_normalize)
EINSUM = Rule(_einsum)
MEAN = Rule(_reduction("mean"))
SUM = Rule(_reduction("sum"))
MAX = Rule(_reduction("max"))
SOFTMAX = Rule(_softmax)

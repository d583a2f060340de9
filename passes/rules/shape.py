"""Shape and data-movement rules: views, permutes, cat/split, indexing, sizes, pooling.

Labels move with the data: a permute permutes the label arrays, cat concatenates them, split
and slicing cut them, a view merges/splits them (`passes.labels.reshape`). Rewrites replace
literal sizes in the graph by the pruned sizes (`x.view(-1, 320)` -> `x.view(-1, 160)`), slice
bounds by the number of kept positions before them, and `chunk`/`split` on a pruned dim by an
explicit `torch.split` with the pruned section sizes.
"""

from __future__ import annotations

import operator
import re

import numpy as np
import torch
import torch.fx as fx

from .. import labels as L
from ..channels import SizeVal
from .base import UNKNOWN, Rule, arg, set_arg


def _x(ctx, node):
    return ctx.labels(node.args[0])


def _out_shape(node):
    return tuple(node.meta["tensor_meta"].shape)


# -- reshape family -------------------------------------------------------------------------
def _reshape(ctx, node):
    x = _x(ctx, node)
    out = L.reshape(ctx.uf, ctx.pin, x, [len(a) for a in x], _out_shape(node),
                    ctx.why("a view merges two channel dims"), computed=_computed_dims(node),
                    choose=ctx.choose_split)
    for k, s in enumerate(_size_args(node)):  # e.g. view(b, 16, c // 16, h, w) where the labels
        v = ctx.labels(s)                     # went to the 16: c // 16 would change with c
        if isinstance(v, SizeVal) and k < len(out) and not out[k].any():
            ctx.pin(v.atoms, ctx.why("a channel count sizes a non-channel dim of a view"))
    return out


def _size_args(node) -> list:
    """The size arguments of view/reshape (varargs, one sequence, or keyword shape/size)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in ("view", "reshape"):
        return []
    sizes = node.args[1:] or (node.kwargs.get("shape") or node.kwargs.get("size") or (),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return list(sizes)


def _computed_dims(node):
    """Output dims of view/reshape whose size is not a literal (a traced value or -1)."""
    return [k for k, s in enumerate(_size_args(node)) if not isinstance(s, int) or s == -1]


def _reshape_rewrite(rctx, node):
    if node.op == "call_module":
        m = rctx.module(node)
        if isinstance(m, torch.nn.Unflatten):
            dim = m.dim % len(rctx.labels_of(node))
            m.unflattened_size = tuple(rctx.new_shape(node)[dim:dim + len(m.unflattened_size)])
        return
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in ("view", "reshape"):
        _rewrite_size_args(rctx, node, infer=True)
    elif name == "unflatten":
        new, labelled = rctx.new_shape(node), _labelled(rctx, node)
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        dim = dim % len(new)
        k = slice(dim, dim + len(sizes))
        set_arg(node, 2, "sizes", tuple(_fix_sizes(sizes, new[k], labelled[k], infer=True,
                                                   old=tuple(node.meta["tensor_meta"].shape)[k],
                                                   changes=_changes(rctx), scale=_scaled(node))))


def _labelled(rctx, node):
    return [a.any() for a in rctx.labels_of(node)]


def _fix_sizes(sizes, new, labelled, infer: bool = False, old=None, changes=lambda s: True, scale=None):
    """Literal sizes become the pruned sizes. A computed size on a channel dim is replaced
    unless the dim keeps its size (`old`) and the computed value does not change either:
    - with `infer` (view, reshape, unflatten), by -1 when it is the only one replaced and no
      size is -1 already (the size can hold the batch too: timm's MobileViT reshapes to
      `B * C * num_patch_h`, which a literal fixes at the example's batch);
    - else, when its value does not count removed channels (`changes`: it is `B * num_heads`,
      timm's HaloNet, with a head removed), by `scale(s, new, old)`: s * new // old, computed
      in the graph, so the batch stays free;
    - else by the planned literal (a width read from another tensor: MaxViT reshapes attention
      output to the input's width)."""
    old = new if old is None else old
    replace = [isinstance(s, fx.Node) and lab and (n != o or changes(s))
               for s, n, o, lab in zip(sizes, new, old, labelled)]
    minus_one = infer and sum(replace) == 1 and not any(isinstance(s, int) and s == -1 for s in sizes)
    out = []
    for s, n, o, r in zip(sizes, new, old, replace):
        if isinstance(s, int) and s != -1:
            out.append(n)
        elif not r:
            out.append(s)
        elif minus_one:
            out.append(-1)
        elif scale is not None and not changes(s) and o:
            out.append(scale(s, n, o))
        else:
            out.append(n)
    return out


def _changes(rctx):
    """Whether a computed size's value changes with the pruning: it counts removed channels."""
    def changes(s) -> bool:
        v = rctx.cg.values.get(s.name)
        return isinstance(v, SizeVal) and bool(rctx.removed[v.atoms].any())
    return changes


def _scaled(node):
    """s * new // old as graph nodes before `node`."""
    def scale(s, n, o):
        with node.graph.inserting_before(node):
            return node.graph.call_function(operator.floordiv, (node.graph.call_function(operator.mul, (s, n)), o))
    return scale


def _rewrite_size_args(rctx, node, infer: bool = False):
    """Sizes passed as varargs (`x.view(a, b)`), as one sequence (`x.view((a, b))`,
    `torch.reshape(x, shape)`), or as keyword `shape`/`size`. `infer`: see `_fix_sizes`."""
    new, labelled = rctx.new_shape(node), _labelled(rctx, node)
    fix = dict(infer=infer, old=tuple(node.meta["tensor_meta"].shape), changes=_changes(rctx), scale=_scaled(node))
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        node.args = (node.args[0], type(sizes[0])(_fix_sizes(sizes[0], new, labelled, **fix)))
    elif sizes:
        node.args = (node.args[0], *_fix_sizes(sizes, new, labelled, **fix))
    else:
        for key in ("shape", "size"):
            if key in node.kwargs:
                node.kwargs = {**node.kwargs, key: tuple(_fix_sizes(node.kwargs[key], new, labelled, **fix))}


def _permute(ctx, node):
    x = _x(ctx, node)
    dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    return tuple(x[d] for d in dims)


def _transpose(ctx, node):
    x = list(_x(ctx, node))
    d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    x[d0], x[d1] = x[d1], x[d0]
    return tuple(x)


def _expand(ctx, node):
    """New leading dims and expanded size-1 dims hold no channel; a single channel (a size-1 dim
    with a channel label) that is expanded is pinned, as when it is a broadcast operand."""
    x = _x(ctx, node)
    out = _out_shape(node)
    lead = len(out) - len(x)
    for k, s in enumerate(out[lead:]):
        if len(x[k]) != s and x[k].any():
            ctx.pin(x[k], ctx.why("a single channel is expanded"))
    return tuple(L.zeros(s) if k < lead or len(x[k - lead]) != s else x[k - lead]
                 for k, s in enumerate(out))


def _expand_rewrite(rctx, node):
    if node.target == "expand":
        _rewrite_size_args(rctx, node)


def _repeat(ctx, node):
    """x.repeat(*reps): dim k holds reps[k] copies of x's dim k (new leading dims: no channel)."""
    x = _x(ctx, node)
    reps = node.args[1:]
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
        reps = reps[0]
    if not all(isinstance(r, int) for r in reps):
        return UNKNOWN.labels(ctx, node)
    lead = len(reps) - len(x)
    return tuple(L.zeros(r) for r in reps[:lead]) + tuple(np.tile(a, r) for a, r in zip(x, reps[lead:]))


def _repeat_interleave(ctx, node):
    """repeat_interleave(x, repeats, dim): each position along `dim` repeated; that dim holds no
    channel afterwards (a labelled one is pinned), the others keep theirs. Without `dim` the
    result is flat, and everything labelled is pinned; repeats given as a tensor are values."""
    x = _x(ctx, node)
    if not isinstance(x, tuple):
        return UNKNOWN.labels(ctx, node)
    shape = _out_shape(node)
    reps = ctx.labels(arg(node, 1, "repeats"))
    if isinstance(reps, tuple):
        ctx.pin_value(reps, ctx.why("repeat counts given as a tensor"))
    dim = arg(node, 2, "dim")
    if dim is None:
        ctx.pin_value(x, ctx.why("repeat_interleave flattens its input"))
        return tuple(L.zeros(s) for s in shape)
    d = dim % len(x)
    ctx.pin(x[d], ctx.why("repeat_interleave along a channel dim"))
    return tuple(L.zeros(shape[d]) if k == d else a for k, a in enumerate(x))


# -- cat, stack, split ------------------------------------------------------------------------
def _parts(ctx, node):
    """Labels of the tensors a cat/stack joins: a list of nodes, or one node whose value is a
    tuple of tensors (`torch.stack(torch.meshgrid(...))`); None for anything else."""
    tensors = arg(node, 0, "tensors")
    if isinstance(tensors, fx.Node):
        v = ctx.labels(tensors)
        ok = isinstance(v, (tuple, list)) and v and all(
            isinstance(p, tuple) and all(isinstance(a, np.ndarray) for a in p) for p in v)
        return list(v) if ok else None
    return [ctx.labels(t) for t in tensors]


def _cat(ctx, node):
    parts = _parts(ctx, node)
    if parts is None:
        return UNKNOWN.labels(ctx, node)
    dim = arg(node, 1, "dim", 0)
    nd = len(_out_shape(node))
    dim %= nd
    parts = [p for p in parts if len(p) == nd]  # torch.cat skips empty 1-D tensors
    reason = ctx.why("cat of a channel with a non-channel dim")
    out = []
    for k in range(nd):
        if k == dim:
            out.append(np.concatenate([p[k] for p in parts]))
        else:
            for p in parts[1:]:
                ctx.unify(parts[0][k], p[k], reason)
            out.append(parts[0][k])
    return tuple(out)


def _stack(ctx, node):
    parts = _parts(ctx, node)
    if parts is None:
        return UNKNOWN.labels(ctx, node)
    dim = arg(node, 1, "dim", 0) % (len(parts[0]) + 1)
    for p in parts[1:]:
        for a, b in zip(parts[0], p):
            ctx.unify(a, b, ctx.why("stack of a channel with a non-channel dim"))
    out = list(parts[0])
    out.insert(dim, L.zeros(len(parts)))
    return tuple(out)


def _split(ctx, node):
    x = _x(ctx, node)
    dim = arg(node, 2, "dim", 0) % len(x)
    metas = node.meta["tensor_meta"]
    outs, start = [], 0
    for m in metas:
        n = m.shape[dim]
        out = list(x)
        out[dim] = x[dim][start:start + n]
        outs.append(tuple(out))
        start += n
    return tuple(outs)


def _split_rewrite(rctx, node):
    x = rctx.labels_of(node.args[0])
    dim = arg(node, 2, "dim", 0) % len(x)
    if rctx.count(x[dim]) == len(x[dim]):
        return
    sizes, start = [], 0
    for m in node.meta["tensor_meta"]:
        n = m.shape[dim]
        sizes.append(rctx.count(x[dim][start:start + n]))
        start += n
    if 0 in sizes:
        raise rctx.error(node, f"split section sizes {sizes} on dim {dim}: a section would be empty")
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


def _unbind(ctx, node):
    x = _x(ctx, node)
    dim = arg(node, 1, "dim", 0) % len(x)
    ctx.pin(x[dim], ctx.why("unbind makes one output per position"))
    rest = x[:dim] + x[dim + 1:]
    return tuple(rest for _ in range(len(x[dim])))


# -- indexing ---------------------------------------------------------------------------------
def _getitem(ctx, node):
    obj, idx = ctx.labels(node.args[0]), node.args[1]
    if obj is None:
        return None
    if not _is_tensor_labels(obj):  # a tuple of outputs, a size tuple
        if isinstance(idx, int):
            return obj[idx]
        if isinstance(idx, slice):
            return obj[idx]
        return None
    return _index(ctx, node, obj, idx, rewrite=None)


def _is_tensor_labels(v) -> bool:
    return isinstance(v, tuple) and all(isinstance(a, np.ndarray) for a in v)


def _expand_index(idx, ndim):
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out = []
    for i in idx:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - n_real))
        else:
            out.append(i)
    return out


def _index(ctx, node, x, idx, rewrite):
    """Labels of x[idx]; with `rewrite` (a RewriteCtx) returns the rewritten index instead."""
    items = _expand_index(idx, len(x))
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) and not isinstance(i, slice) for i in items):
        if rewrite is None:
            return UNKNOWN.labels(ctx, node)
        return idx
    out, new_items, d = [], [], 0
    for it in items:
        if it is None:
            out.append(L.zeros(1))
            new_items.append(None)
            continue
        arr = x[d]
        n = len(arr)
        if isinstance(it, int):
            i = it % n
            if rewrite is None:
                ctx.pin(arr[i:i + 1], ctx.why("indexed by a constant"))
            new_items.append(rewrite.count(arr[:i]) if rewrite else it)
        else:  # slice
            parts = (it.start, it.stop, it.step)
            dynamic = any(isinstance(p, fx.Node) for p in parts)
            if dynamic:
                if rewrite is None:
                    if arr.any():
                        ctx.pin(arr, ctx.why("sliced with a computed bound"))
                    out.append(None)  # filled from meta below
                new_items.append(it)
            else:
                start, stop, step = slice(*parts).indices(n)
                if rewrite is None:
                    piece = arr[start:stop:step]
                    if step != 1 and arr.any():
                        ctx.pin(arr, ctx.why("strided slice of a channel dim"))
                    out.append(piece)
                elif arr.any() and step == 1:
                    new_items.append(slice(None if it.start is None else rewrite.count(arr[:start]),
                                           None if it.stop is None else rewrite.count(arr[:stop]), None))
                else:
                    new_items.append(it)
        d += 1
    if rewrite is not None:
        return tuple(new_items) if isinstance(idx, tuple) or len(new_items) != 1 else new_items[0]
    out.extend(x[d:])
    shape = _out_shape(node)
    return tuple(L.zeros(s) if a is None else a for a, s in zip(out, shape))


def _getitem_rewrite(rctx, node):
    x = rctx.labels_of(node.args[0])
    if not _is_tensor_labels(x) or not any(a.any() for a in x):
        return
    node.args = (node.args[0], _index(None, node, x, node.args[1], rewrite=rctx))


# -- sizes ------------------------------------------------------------------------------------
def _size_of(arr):
    return SizeVal(arr) if arr.any() else None


def _size(ctx, node):
    x = _x(ctx, node)
    d = arg(node, 1, "dim")
    if d is None:
        return tuple(_size_of(a) for a in x)
    return _size_of(x[d])


def _numel(ctx, node):
    x = _x(ctx, node)
    return _size_of(np.concatenate(x)) if x else None


def _len(ctx, node):
    x = _x(ctx, node)
    return _size_of(x[0]) if _is_tensor_labels(x) and x else None


def _getattr(ctx, node):
    x, name = _x(ctx, node), node.args[1]
    if not _is_tensor_labels(x):
        return None
    if name == "shape":
        return tuple(_size_of(a) for a in x)
    if name in ("T", "mT"):
        return tuple(reversed(x)) if name == "T" else x[:-2] + (x[-1], x[-2])
    if name in ("data",):
        return x
    return None


def _create(ctx, node):
    """torch.zeros/ones/empty(size), x.new_zeros(size), ...: a new tensor, no channel dims. A
    channel count among the sizes is pinned (as a view's, `_reshape`): the new dim is not a
    channel, and its size would change with the count."""
    ctx.pin_sizes(ctx.labels([*node.args, *node.kwargs.values()]), "a channel count sizes a new tensor")
    return ctx.unlabeled_like(node)


def _full(ctx, node):
    """torch.full(size, fill_value), x.new_full(size, fill_value): the size is a shape, the
    fill value a number, so a channel count given as the value is pinned."""
    fill = arg(node, 2 if node.op == "call_method" else 1, "fill_value")
    ctx.pin_value(ctx.labels(fill), ctx.why("a channel count is used as a number"))
    return _create(ctx, node)


# -- channel-preserving ops over other dims ---------------------------------------------------
def _keep_leading(ctx, node):
    """Pooling, interpolation: the leading (batch, channel) dims keep their labels; the pooled
    or resampled dims (as many as the op's 1d/2d/3d says; all but two for interpolation) are
    new, and channels found in them are pinned: a window mixes neighbouring positions."""
    x = _x(ctx, node)
    meta = node.meta["tensor_meta"]
    n = max(len(x) - _spatial_dims(ctx, node, len(x)), 0)
    ctx.pin_value(x[n:], ctx.why("pooling or resampling over a channel dim"))
    if not hasattr(meta, "shape"):  # return_indices=True: (values, indices)
        return tuple(_keep(x, m.shape, n) for m in meta)
    return _keep(x, meta.shape, n)


def _spatial_dims(ctx, node, ndim: int) -> int:
    name = type(ctx.module(node)).__name__ if node.op == "call_module" else getattr(node.target, "__name__", "")
    found = re.search(r"([123])d$", name)
    return int(found.group(1)) if found else ndim - 2


def _keep(x, shape, n):
    return tuple(x[k] if k < n and len(x[k]) == s else L.zeros(s) for k, s in enumerate(shape))


def _tile_last(ctx, node):
    """Other dims are new (pooled, padded); the last dim is k copies of the input channels
    (torchvision's `_patch_merging_pad`: four strided spatial slices concatenated on channels)."""
    x = _x(ctx, node)
    shape = _out_shape(node)
    if shape[-1] % len(x[-1]):
        return UNKNOWN.labels(ctx, node)
    ctx.pin_value(x[:-1], ctx.why("strided slices of a channel dim"))
    return tuple(L.zeros(s) for s in shape[:-1]) + (np.tile(x[-1], shape[-1] // len(x[-1])),)


def _pad(ctx, node):
    x = _x(ctx, node)
    pad = ctx.module(node).padding if node.op == "call_module" else arg(node, 1, "pad")  # nn.*Pad*d or F.pad
    shape = _out_shape(node)
    out = list(x)
    for i in range(len(pad) // 2):
        d = len(x) - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            ctx.pin(x[d], ctx.why("padding of a channel dim"))
            out[d] = L.zeros(shape[d])
    return tuple(out)


def _roll(ctx, node):
    """torch.roll along given dims: labels stay; a rolled channel dim is pinned (removing a
    channel would move the others). Without dims it rolls the flattened tensor: unknown."""
    x = _x(ctx, node)
    dims = arg(node, 2, "dims")
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(x, tuple) or not isinstance(dims, (tuple, list)) or not dims \
            or not all(type(d) is int and -len(x) <= d < len(x) for d in dims):
        return UNKNOWN.labels(ctx, node)
    for d in dims:
        ctx.pin(x[d], ctx.why("roll along a channel dim"))
    return x


def _channel_shuffle(ctx, node):
    x = _x(ctx, node)
    g = ctx.module(node).groups
    c = x[1]
    parts = L.split(ctx.uf, c, [g, len(c) // g], force=1)  # channel i of every group together
    shuffled = L.merge(ctx.pin, [parts[1], parts[0]], ctx.why("channel shuffle"))
    return (x[0], shuffled) + tuple(x[2:])


RESHAPE = Rule(_reshape, _reshape_rewrite, shape_args=True)
PERMUTE = Rule(_permute)
TRANSPOSE = Rule(_transpose)
EXPAND = Rule(_expand, _expand_rewrite, shape_args=True)
REPEAT = Rule(_repeat)
REPEAT_INTERLEAVE = Rule(_repeat_interleave)
CAT = Rule(_cat)
STACK = Rule(_stack)
SPLIT = Rule(_split, _split_rewrite, shape_args=True)
UNBIND = Rule(_unbind)
GETITEM = Rule(_getitem, _getitem_rewrite, shape_args=True)
SIZE = Rule(_size)
NUMEL = Rule(_numel)
LEN = Rule(_len)
GETATTR = Rule(_getattr)
CREATE = Rule(_create, shape_args=True)
FULL = Rule(_full, shape_args=True)
KEEP_LEADING = Rule(_keep_leading, shape_args=True)
TILE_LAST = Rule(_tile_last)
PAD = Rule(_pad)
ROLL = Rule(_roll)
CHANNEL_SHUFFLE = Rule(_channel_shuffle)

"""Layer rules: conv, linear, embedding, normalisation, PReLU (modules and functional forms).

Producers (conv/linear output rows, embedding columns) make fresh atoms through their
parameters; consumers unify their input dim with the weight's input dim, which is marked
*passive* (it does not define a group). Grouped convs keep every group the same size:
depthwise convs (one input channel per group) remove whole groups, so `groups` shrinks with
the channels; other grouped convs remove position j of every group at once, keeping `groups`.
Norm layers label their parameters with the channels they normalise, and record a "norm"
reduction over the dims their statistics span (LayerNorm's normalised dims, GroupNorm's groups,
batch statistics, instance statistics) when those can lose positions: the statistics change.
Rewrites set module attributes from the sliced parameters (in/out_channels, groups,
num_features, normalized_shape, ...), so the module is consistent with its weights.
"""

from __future__ import annotations

import torch

from .. import labels as L
from ..channels import attr_at
from ..modules import module_attr
from .base import UNKNOWN, Rule, arg, set_arg


def _spatial_out(ctx, node, x, ch_out, ch, pointwise):
    """Output labels of a conv: leading (batch) dims as the input's, the channel dim `ch_out`,
    and each spatial dim new, except where the conv is pointwise along it (kernel 1, stride 1,
    no padding): there output position i is input position i, and keeps its labels (timm's
    CoaT aggregates three feature vectors with a Conv1d whose length dim holds the channels).
    Channels in any other spatial dim are pinned: a window mixes neighbouring positions."""
    shape = tuple(node.meta["tensor_meta"].shape)
    out = []
    for k, n in enumerate(shape):
        a = x[k] if k < len(x) else None
        if k == ch:
            out.append(ch_out)
        elif a is not None and len(a) == n and (k < ch or pointwise[k - ch - 1]):
            out.append(a)
        else:
            if a is not None and k > ch and a.any():
                ctx.pin(a, ctx.why("a conv window spans a channel dim"))
            out.append(L.zeros(n))
    return tuple(out)


def _per_dim(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _pointwise(kernel: tuple, stride, padding, output_padding=0) -> list[bool]:
    """Per spatial dim: is the conv pointwise along it (kernel 1, stride 1, no padding)."""
    n = len(kernel)
    if isinstance(padding, str):  # "valid" pads nothing; "same" pads nothing for a kernel of 1
        padding = 0 if padding == "valid" or all(k == 1 for k in kernel) else 1
    return [k == 1 and s == 1 and p == 0 and o == 0 for k, s, p, o in
            zip(kernel, _per_dim(stride, n), _per_dim(padding, n), _per_dim(output_padding, n))]


def _channel_dim(x, spatial: int) -> int:
    """The channel dim of a conv's input labels `x` with `spatial` kernel dims: 1 for a batched
    input, 0 for an unbatched one."""
    return len(x) - spatial - 1


def conv_labels(ctx, node, x, w, b, groups, pointwise):
    ch = _channel_dim(x, len(w) - 2)
    reason = ctx.why("conv input meets a non-channel dim")
    if groups == 1:
        ctx.unify(x[ch], w[1], reason)
    else:
        c, o = len(x[ch]), len(w[0])
        in_per, out_per = c // groups, o // groups
        w0 = w[0].reshape(groups, out_per)
        if in_per == 1:  # depthwise (with multiplier): a channel and its group go together
            for j in range(out_per):
                ctx.unify(x[ch], w0[:, j].copy(), reason)
        else:  # position j of every group goes together; groups stay
            xg = x[ch].reshape(groups, in_per)
            for g in range(groups):
                ctx.unify(xg[g].copy(), w[1], reason)
            for g in range(1, groups):
                ctx.unify(w0[0].copy(), w0[g].copy(), reason)
    if b is not None:
        ctx.unify(b[0], w[0], reason)
    return _spatial_out(ctx, node, x, w[0], ch, pointwise)


def _conv(ctx, node):
    m = ctx.module(node)
    x = ctx.labels(node.args[0])
    kernel = tuple(m.kernel_size)
    # the weight's input dim and the bias carry the arrays they are unified with (`tensor_labels`)
    w = ctx.param(m, "weight", {1: x[_channel_dim(x, len(kernel))]} if m.groups == 1 else None)
    b = ctx.param(m, "bias", {0: w[0]})
    ctx.mark_passive(m, "weight", 1)
    return conv_labels(ctx, node, x, w, b, m.groups, _pointwise(kernel, m.stride, m.padding))


def _conv_sizes(m):
    w = m.weight
    if m.groups > 1 and m.in_channels // m.groups == 1:
        m.groups = w.shape[0] // (m.out_channels // m.groups)
    m.out_channels = w.shape[0]
    m.in_channels = w.shape[1] * m.groups


def _conv_fn(ctx, node):
    groups = arg(node, 6, "groups", 1)
    if groups != 1:
        return UNKNOWN.labels(ctx, node)
    w_node = arg(node, 1, "weight")
    b_node = arg(node, 2, "bias")
    w = ctx.labels(w_node)
    ctx.mark_passive(None, _tensor_of(ctx, w_node), 1)
    pointwise = _pointwise(tuple(len(a) for a in w[2:]), arg(node, 3, "stride", 1), arg(node, 4, "padding", 0))
    return conv_labels(ctx, node, ctx.labels(node.args[0]), w, ctx.labels(b_node), 1, pointwise)


def _conv_t(ctx, node):
    m = ctx.module(node)
    if m.groups != 1:
        return UNKNOWN.labels(ctx, node)
    x = ctx.labels(node.args[0])
    w, b = ctx.param(m, "weight"), ctx.param(m, "bias")  # weight: [in, out, k...]
    ch = _channel_dim(x, len(w) - 2)
    ctx.unify(x[ch], w[0], ctx.why("conv input meets a non-channel dim"))
    ctx.mark_passive(m, "weight", 0)
    if b is not None:
        ctx.unify(b[0], w[1])
    pointwise = _pointwise(tuple(m.kernel_size), m.stride, m.padding, output_padding=m.output_padding)
    return _spatial_out(ctx, node, x, w[1], ch, pointwise)


def _conv_t_sizes(m):
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def linear_labels(ctx, x, w, b):
    ctx.unify(x[-1], w[1], ctx.why("linear input meets a non-channel dim"))
    if b is not None:
        ctx.unify(b[0], w[0])
    return tuple(x[:-1]) + (w[0],)


def _linear(ctx, node):
    m = ctx.module(node)
    ctx.mark_passive(m, "weight", 1)
    x = ctx.labels(node.args[0])
    w = ctx.param(m, "weight", {1: x[-1]})  # the arrays they are unified with (`tensor_labels`)
    return linear_labels(ctx, x, w, ctx.param(m, "bias", {0: w[0]}))


def _linear_sizes(m):
    m.out_features, m.in_features = m.weight.shape


def _linear_fn(ctx, node):
    w_node = arg(node, 1, "weight")
    ctx.mark_passive(None, _tensor_of(ctx, w_node), 1)
    return linear_labels(ctx, ctx.labels(node.args[0]), ctx.labels(w_node),
                         ctx.labels(arg(node, 2, "bias")))


def _tensor_of(ctx, n):
    """The parameter a get_attr node reads (None for anything else)."""
    if n is None or getattr(n, "op", None) != "get_attr":
        return None
    return attr_at(ctx.gm, n.target)


def _embedding(ctx, node):
    m = ctx.module(node)
    w = ctx.param(m, "weight")
    ctx.pin(w[0], ctx.why("embedding rows are looked up by index"))
    return tuple(ctx.labels(node.args[0])) + (w[1],)


def _embedding_sizes(m):
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _channel_params(ctx, m, x_ch, names):
    reason = ctx.why("norm parameter")
    for name in names:
        t = module_attr(m, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == len(x_ch):
            ctx.tie(t, (x_ch,), reason)
            ctx.mark_passive(None, t)


def _batch_norm(ctx, node, instance: bool = False):
    m = ctx.module(node)
    x = ctx.labels(node.args[0])
    _channel_params(ctx, m, x[1], ("weight", "bias", "running_mean", "running_var"))
    if m.training or m.running_mean is None:  # batch statistics over every dim but 1; instance
        # statistics (per sample and channel) over the spatial dims
        ctx.reduce(0, range(2, len(x)) if instance else [d for d in range(len(x)) if d != 1], "norm", x)
    return x


def _instance_norm(ctx, node):
    return _batch_norm(ctx, node, instance=True)


def _fn_channel_params(ctx, node, x_ch, params):
    """A norm function's per-channel parameter arguments ((position, name) pairs) carry the
    channels it normalises."""
    for i, name in params:
        n = arg(node, i, name)
        p = ctx.labels(n)
        if p is not None:
            ctx.unify(x_ch, p[0], ctx.why("norm parameter"))
            ctx.mark_passive(None, _tensor_of(ctx, n))


def _num_features_rewrite(rctx, node):
    m = rctx.module(node)
    m.num_features = rctx.count(rctx.labels_of(node.args[0])[1])


def _batch_norm_fn(ctx, node):
    x = ctx.labels(node.args[0])
    _fn_channel_params(ctx, node, x[1], ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    if arg(node, 5, "training", False) is not False or arg(node, 1, "running_mean") is None:
        # batch statistics over every dim but 1 (timm's weight standardisation runs this on a
        # conv weight viewed as [1, out, in * k * k]: the statistics span the input channels)
        ctx.reduce(0, [d for d in range(len(x)) if d != 1], "norm", x)
    return x


def _layer_norm(ctx, node):
    m = ctx.module(node)
    x = ctx.labels(node.args[0])
    k = len(m.normalized_shape)
    for name in ("weight", "bias"):
        p = ctx.param(m, name, dict(enumerate(x[-k:])))  # the arrays they are unified with
        if p is not None:
            for a, b in zip(x[-k:], p):
                ctx.unify(a, b, ctx.why("norm parameter"))
            ctx.mark_passive(m, name)
    ctx.reduce(0, range(len(x) - k, len(x)), "norm", x)
    return x


def _layer_norm_rewrite(rctx, node):
    m = rctx.module(node)
    x = rctx.labels_of(node.args[0])
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(rctx.count(a) for a in x[-k:])


def _layer_norm_fn(ctx, node):
    x = ctx.labels(node.args[0])
    shape = arg(node, 1, "normalized_shape")
    k = len(shape)
    for i, name in ((2, "weight"), (3, "bias")):
        n = arg(node, i, name)
        p = ctx.labels(n)
        if p is not None:
            for a, b in zip(x[-k:], p):
                ctx.unify(a, b, ctx.why("norm parameter"))
            ctx.mark_passive(None, _tensor_of(ctx, n))
    ctx.reduce(0, range(len(x) - k, len(x)), "norm", x)
    return x


def _layer_norm_fn_rewrite(rctx, node):
    x = rctx.labels_of(node.args[0])
    k = len(arg(node, 1, "normalized_shape"))
    set_arg(node, 1, "normalized_shape", [rctx.count(a) for a in x[-k:]])


def _group_norm(ctx, node):
    m = ctx.module(node)
    x = ctx.labels(node.args[0])
    c = x[1]
    _group_stats(ctx, x, m.num_groups)
    _channel_params(ctx, m, c, ("weight", "bias"))
    return x


def _group_stats(ctx, x, groups):
    """Position j of every group goes together (groups stay the same size); the statistics
    span a group's channels (when it holds several) and the spatial dims."""
    c = x[1]
    per = len(c) // groups
    if per > 1:
        grid = c.reshape(groups, per)
        for g in range(1, groups):
            ctx.unify(grid[0].copy(), grid[g].copy())
    ctx.reduce(0, range(1 if per > 1 else 2, len(x)), "norm", x)


def _group_norm_rewrite(rctx, node):
    m = rctx.module(node)
    c = rctx.count(rctx.labels_of(node.args[0])[1])
    if m.num_channels == m.num_groups:
        m.num_groups = c
    m.num_channels = c


def _group_norm_fn(ctx, node):
    """F.group_norm(x, num_groups, weight, bias, eps): as the module; a literal group count."""
    x = ctx.labels(node.args[0])
    groups = arg(node, 1, "num_groups")
    if x is None or type(groups) is not int or groups <= 0 or len(x) < 2 or len(x[1]) % groups:
        return UNKNOWN.labels(ctx, node)
    _group_stats(ctx, x, groups)
    _fn_channel_params(ctx, node, x[1], ((2, "weight"), (3, "bias")))
    return x


def _group_norm_fn_rewrite(rctx, node):
    x = rctx.labels_of(node.args[0])
    if x is None or len(x) < 2:  # the labels were not read (the op was treated as unknown)
        return
    if arg(node, 1, "num_groups") == len(x[1]):  # one channel per group: the groups go with them
        set_arg(node, 1, "num_groups", rctx.count(x[1]))


def _prelu(ctx, node):
    m = ctx.module(node)
    x = ctx.labels(node.args[0])
    if m.num_parameters > 1:
        _channel_params(ctx, m, x[1], ("weight",))
    return x


def _prelu_sizes(m):
    m.num_parameters = m.weight.numel()


def _norm_sizes(m):
    """A traced-through batch or instance norm: its channel count from its per-channel tensors."""
    t = m.running_mean if m.running_mean is not None else m.weight
    if t is not None:
        m.num_features = len(t)


def _group_norm_sizes(m):
    """A traced-through GroupNorm: its channel count from its affine weight (the group count is
    a graph argument: rewritten there, it makes a GraphModule)."""
    if m.weight is not None:
        m.num_channels = len(m.weight)


# layer classes whose size attributes follow from their tensors alone, most specific first
_SIZES = ((torch.nn.modules.conv._ConvTransposeNd, _conv_t_sizes), (torch.nn.modules.conv._ConvNd, _conv_sizes),
          (torch.nn.Linear, _linear_sizes), (torch.nn.Embedding, _embedding_sizes), (torch.nn.PReLU, _prelu_sizes),
          (torch.nn.modules.batchnorm._NormBase, _norm_sizes), (torch.nn.GroupNorm, _group_norm_sizes))


def set_sizes(m: torch.nn.Module) -> None:
    """Size attributes of a torch.nn layer (in/out_channels, in/out_features, num_features,
    ...) from its sliced tensors, for a module the rules saw only through its forward's ops:
    a subclass outside torch.nn that fx traces through (timm's StdConv2d, BatchNormAct2d) in a
    model that keeps its class. Other modules are left as they are."""
    for cls, fn in _SIZES:
        if isinstance(m, cls):
            fn(m)
            return


def _sizes_rewrite(rctx, node):
    """A layer's size attributes from its sliced tensors (`set_sizes`)."""
    set_sizes(rctx.module(node))


CONV = Rule(_conv, _sizes_rewrite)
CONV_FN = Rule(_conv_fn)
CONV_T = Rule(_conv_t, _sizes_rewrite)
LINEAR = Rule(_linear, _sizes_rewrite)
LINEAR_FN = Rule(_linear_fn)
EMBEDDING = Rule(_embedding, _sizes_rewrite)
BATCH_NORM = Rule(_batch_norm, _num_features_rewrite)
BATCH_NORM_FN = Rule(_batch_norm_fn)
GROUP_NORM_FN = Rule(_group_norm_fn, _group_norm_fn_rewrite)
INSTANCE_NORM = Rule(_instance_norm, _num_features_rewrite)
LAYER_NORM = Rule(_layer_norm, _layer_norm_rewrite)
LAYER_NORM_FN = Rule(_layer_norm_fn, _layer_norm_fn_rewrite)
GROUP_NORM = Rule(_group_norm, _group_norm_rewrite)
PRELU = Rule(_prelu, _sizes_rewrite)

"""Closed-form output shapes (and MACs) for the commonest leaf ops, used by the meta shape pass.

On meta tensors most of a forward's cost is torch's Python meta kernels: measured on resnet50
(224x224), BatchNorm2d took 1.2 ms per call on meta, Conv2d 0.12 ms, a residual add 0.23 ms,
while the formula below costs a few microseconds; a pooling layer or a flatten that ran its
kernel cost 0.4-0.8 ms each (the three in resnet50 were half of its meta pass), a cat 0.44 ms
(densenet201 has 102). `fast_meta` returns the output of a node (a meta tensor) and its MACs,
or None when the op is not one of these, or when anything about the call (a subclass, a
padding mode, a dtype, a size that does not fit) is outside the formula: then the op itself
runs on meta tensors, exactly as before, and raises if it must.

MACs equal what `torch.utils.flop_counter.FlopCounterMode` counts for the same call
(`passes.count`): conv = batch x prod(weight shape) x prod(output spatial), linear = rows x
in x out, attention = its projections plus 2 x batch x queries x keys x head width per head,
normalisation, activations, pooling, flatten and elementwise arithmetic 0. Channel counts
come from the weights, as in the functional ops, never from module attributes.
tests/test_core.py and tests/test_torchvision.py compare every node's tensor_meta (strides
included) and the MACs with the plain meta pass, on whole models, before and after pruning.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .modules import SlimMultiheadAttention, module_attr

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)  # in eval mode
_BN_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_ATTENTION = (nn.MultiheadAttention, SlimMultiheadAttention)
_ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_MAX_POOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVG_POOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG_POOL = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")  # contiguous, as the meta conv/linear kernels


def meta_like(x: torch.Tensor) -> torch.Tensor:
    """Same shape, strides and dtype on the meta device, a plain tensor (for a dense x, what
    elementwise kernels produce). empty_like on meta runs a Python reference (0.3 ms),
    empty_strided a C++ kernel (3 us)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): the layouts elementwise kernels keep."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _float_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta and x.dtype == torch.float32


def fast_meta(op: str, target, module: nn.Module | None, args: tuple, kwargs: dict):
    """(output, macs) of one node from shapes alone, or None to run the op itself."""
    if op == "call_module":
        if type(module) in _ATTENTION:
            return _attention(module, args, kwargs)
        if kwargs or len(args) != 1 or not _float_meta(args[0]) or not _dense(args[0]):
            return None
        return _module(module, args[0])
    if op == "call_method":
        if target == "flatten":
            return _flatten(args, kwargs)
        if target == "permute" and not kwargs:
            return _permute(args[0], args[1:])
        return None
    if op != "call_function":
        return None
    if target is torch.flatten:
        return _flatten(args, kwargs)
    if target in _CAT:
        return _cat(args, kwargs)
    if target is torch.permute and not kwargs and len(args) == 2:
        return _permute(args[0], args[1])
    if target is F.layer_norm:
        return _layer_norm(args, kwargs)
    if target in _ARITH and not kwargs and len(args) == 2:
        a, b = args
        if _float_meta(a) and _float_meta(b) and a.shape == b.shape and a.stride() == b.stride() and _dense(a):
            return meta_like(a), 0
        for t, s in ((a, b), (b, a)):
            if _float_meta(t) and type(s) in (int, float) and _dense(t):  # float tensor with a Python number
                return meta_like(t), 0
            if _float_meta(t) and _float_meta(s) and _broadcasts_into(s, t):
                return _meta(t.shape, t.dtype), 0
    return None


def _bind(args: tuple, kwargs: dict, names: tuple) -> dict | None:
    """A call's arguments by parameter name, or None for more positional arguments than names,
    an argument given twice, or a keyword that is not one of `names`."""
    call = dict(zip(names, args))
    if len(args) > len(names) or set(call) & set(kwargs) or set(kwargs) - set(names):
        return None
    call.update(kwargs)
    return call


def _broadcasts_into(small: torch.Tensor, full: torch.Tensor) -> bool:
    """Both contiguous, `small` broadcasts to `full`'s shape: the elementwise result is then
    contiguous with `full`'s shape (TensorIterator keeps the contiguous order, whichever
    operand comes first)."""
    if small.dim() > full.dim() or not (full.is_contiguous() and small.is_contiguous()) or full.numel() == 0:
        return False
    return all(s == 1 or s == f for s, f in zip(reversed(small.shape), reversed(full.shape)))


_CAT = {torch.cat, torch.concat, torch.concatenate}
_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _cat(args: tuple, kwargs: dict):
    """torch.cat of contiguous float32 tensors of one rank, no empty one: a contiguous result.
    Inputs that also read as channels-last (size-1 dims) are left to the kernel, whose choice of
    layout for them depends on all inputs."""
    if len(args) > 2 or set(kwargs) - {"dim"} or (len(args) == 2 and kwargs):
        return None
    tensors, dim = args[0], (args[1] if len(args) == 2 else kwargs.get("dim", 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not _float_meta(first) or first.dim() == 0:
        return None
    n = first.dim()
    if not -n <= dim < n:
        return None
    dim %= n
    last = _LAST.get(n)
    total = 0
    for t in tensors:
        if (not _float_meta(t) or t.dim() != n or t.numel() == 0 or not t.is_contiguous()
                or (last is not None and t.is_contiguous(memory_format=last))):
            return None
        if any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim):
            return None
        total += t.shape[dim]
    return _meta((*first.shape[:dim], total, *first.shape[dim + 1:]), first.dtype), 0


def _permute(x, dims):
    """A view: sizes and strides permuted."""
    if not _float_meta(x) or not isinstance(dims, (list, tuple)) or not all(type(d) is int for d in dims):
        return None
    n = x.dim()
    if len(dims) != n or not all(-n <= d < n for d in dims) or len({d % n for d in dims}) != n:
        return None
    order = [d % n for d in dims]
    shape, stride = x.shape, x.stride()
    return torch.empty_strided([shape[d] for d in order], [stride[d] for d in order], dtype=x.dtype, device="meta"), 0


def _layer_norm(args: tuple, kwargs: dict):
    """F.layer_norm: a contiguous result of the input's shape (as the module)."""
    call = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"))
    if call is None:
        return None
    x, ns = call.get("input"), call.get("normalized_shape")
    if not _float_meta(x) or not isinstance(ns, (list, tuple)) or not all(type(v) is int for v in ns):
        return None
    ns = tuple(ns)
    if x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns):]) != ns:
        return None
    for p in (call.get("weight"), call.get("bias")):
        if p is not None and not (_float_meta(p) and tuple(p.shape) == ns):
            return None
    return _meta(x.shape, x.dtype), 0


def _module(m: nn.Module, x: torch.Tensor):
    kind = type(m)
    if kind in _PASS_THROUGH and not getattr(m, "training", False):
        return x, 0  # the input itself, as eval-mode dropout and Identity return it
    if kind in _ACTIVATIONS:
        return meta_like(x), 0
    if kind in _BN_DIMS:  # (tensors read once each, through `module_attr`: nn.Module's getattr is a Python call)
        mean, w = module_attr(m, "running_mean", None), module_attr(m, "weight", None)
        ok = (x.dim() in _BN_DIMS[kind] and mean is not None and x.shape[1] == len(mean)
              and x.is_contiguous() and (w is None or (w.dtype == x.dtype and len(w) == x.shape[1])))
        return (meta_like(x), 0) if ok else None
    if kind is nn.LayerNorm:  # its kernel writes a contiguous output whatever the input layout
        ns = tuple(m.normalized_shape)
        ok = (x.dim() >= len(ns) and tuple(x.shape[x.dim() - len(ns):]) == ns
              and (m.weight is None or (m.weight.dtype == x.dtype and tuple(m.weight.shape) == ns)))
        return (_meta(x.shape, x.dtype), 0) if ok else None
    if kind is nn.GroupNorm:
        ok = (x.dim() >= 2 and x.shape[1] % m.num_groups == 0 and x.is_contiguous()
              and (m.weight is None or (m.weight.dtype == x.dtype and len(m.weight) == x.shape[1])))
        return (meta_like(x), 0) if ok else None
    if kind is nn.Linear:
        w = module_attr(m, "weight")
        out_f, in_f = w.shape  # the weight decides, as in F.linear, not the attributes
        if x.dim() < 2 or x.shape[-1] != in_f or w.dtype != x.dtype:
            return None
        return _meta((*x.shape[:-1], out_f), x.dtype), math.prod(x.shape[:-1]) * in_f * out_f
    if kind in _CONV_DIMS:
        return _conv(m, x, _CONV_DIMS[kind])
    if kind in _MAX_POOL and not m.return_indices:
        return _pool(x, _MAX_POOL[kind], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if kind in _AVG_POOL:
        return _pool(x, _AVG_POOL[kind], m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
    if kind in _ADAPTIVE_AVG_POOL:
        return _adaptive_pool(x, _ADAPTIVE_AVG_POOL[kind], m.output_size)
    if kind is nn.Flatten:
        return _flatten((x, m.start_dim, m.end_dim), {})
    return None


def _tuple(v, nd: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _pool(x: torch.Tensor, nd: int, kernel, stride, padding, dilation, ceil_mode: bool):
    """Max/avg pooling of a batched contiguous input: torch's pooling_output_shape (floor, or
    ceil without a last window that starts in the right padding); pooling counts no MACs."""
    k, st, pad, dil = (_tuple(v, nd) for v in (kernel, stride if stride else kernel, padding, dilation))
    if x.dim() != nd + 2 or not x.is_contiguous() or not all(len(v) == nd for v in (k, st, pad, dil)):
        return None
    if not all(type(v) is int for v in (*k, *st, *pad, *dil)) or min(*k, *st, *dil) <= 0:
        return None
    spatial = []
    for size, k_, s_, p_, d_ in zip(x.shape[2:], k, st, pad, dil):
        if p_ > k_ // 2:
            return None  # the op raises its own error
        out = (size + 2 * p_ - d_ * (k_ - 1) - 1 + (s_ - 1 if ceil_mode else 0)) // s_ + 1
        if ceil_mode and (out - 1) * s_ >= size + p_:
            out -= 1
        if out < 1:
            return None
        spatial.append(out)
    return _meta((*x.shape[:2], *spatial), x.dtype), 0


def _adaptive_pool(x: torch.Tensor, nd: int, output_size):
    """Adaptive average pooling of a batched contiguous input (None keeps the input's size)."""
    size = _tuple(output_size, nd)
    if x.dim() != nd + 2 or not x.is_contiguous() or len(size) != nd:
        return None
    spatial = tuple(x.shape[2 + i] if v is None else v for i, v in enumerate(size))
    if not all(type(v) is int and v > 0 for v in spatial) or min(x.shape[1:], default=1) <= 0:
        return None
    return _meta((*x.shape[:2], *spatial), x.dtype), 0


def _flatten(args: tuple, kwargs: dict):
    """torch.flatten / Tensor.flatten / nn.Flatten of a contiguous tensor: a view with the
    merged dims' size, contiguous like its input."""
    call = _bind(args, kwargs, ("input", "start_dim", "end_dim"))
    if call is None:
        return None
    x, start, end = call.get("input"), call.get("start_dim", 0), call.get("end_dim", -1)
    if not (_float_meta(x) and x.is_contiguous() and type(start) is int and type(end) is int and x.dim() > 0):
        return None
    n = x.dim()
    if not (-n <= start < n and -n <= end < n):
        return None
    start, end = start % n, end % n
    if start > end:
        return None
    shape = (*x.shape[:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:])
    return _meta(shape, x.dtype), 0


def _conv(m, x: torch.Tensor, nd: int):
    w = module_attr(m, "weight")  # the weight decides channels and kernel, as in F.conv*d, not the attributes
    if (x.dim() != nd + 2 or w.dim() != nd + 2 or x.shape[1] != w.shape[1] * m.groups
            or w.shape[0] % m.groups or m.padding_mode != "zeros" or w.dtype != x.dtype):
        return None
    kernel = w.shape[2:]
    if m.padding == "same":
        spatial = tuple(x.shape[2:])
    else:
        pad = (0,) * nd if m.padding == "valid" else tuple(m.padding)
        spatial = tuple((x.shape[2 + i] + 2 * pad[i] - m.dilation[i] * (kernel[i] - 1) - 1) // m.stride[i] + 1
                        for i in range(nd))
    if min(spatial, default=1) <= 0:
        return None  # the op raises its own error
    out = (x.shape[0], w.shape[0], *spatial)
    return _meta(out, x.dtype), x.shape[0] * math.prod(w.shape) * math.prod(spatial)


def _attention(m, args: tuple, kwargs: dict):
    """nn.MultiheadAttention (packed projection, no bias_k/zero_attn) and SlimMultiheadAttention,
    batched, without masks: output strides as the module's own forward leaves them."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    call = _bind(args, kwargs, names)
    if call is None:
        return None
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    need, avg = call.get("need_weights", True), call.get("average_attn_weights", True)
    if (call.get("key_padding_mask") is not None or call.get("attn_mask") is not None
            or type(need) is not bool or type(avg) is not bool or call.get("is_causal", False) is not False
            or m.training
            or not all(_float_meta(t) and t.dim() == 3 and _dense(t) for t in (q, k, v)) or k.shape != v.shape):
        return None
    first = m.batch_first
    n, tgt, src = (q.shape[0], q.shape[1], k.shape[1]) if first else (q.shape[1], q.shape[0], k.shape[0])
    if (k.shape[0] if first else k.shape[1]) != n:
        return None
    h = m.num_heads
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn
                or q.shape[2] != e or k.shape[2] != e or m.in_proj_weight.shape != (3 * e, e)
                or m.out_proj.weight.shape != (e, e)):
            return None
        qk = vw = out_f = e
        macs = n * (tgt + 2 * src) * e * e + 2 * n * tgt * src * e + n * tgt * e * e
    else:
        e = m.embed_dim
        qk, vw = h * m.qk_head_dim, h * m.v_head_dim
        out_f, out_in = m.out_proj.weight.shape
        if (q.shape[2] != e or k.shape[2] != e or m.in_proj_weight.shape != (2 * qk + vw, e) or out_in != vw):
            return None
        macs = n * (tgt + src) * e * qk + n * src * e * vw + n * h * tgt * src * (qk // h + vw // h) + n * tgt * vw * out_f
    if first:  # computed (tgt, n, out) then transposed, or (n, tgt, out) contiguous: see below
        out = (torch.empty_strided((n, tgt, out_f), (out_f, n * out_f, 1), dtype=q.dtype, device="meta")
               if isinstance(m, nn.MultiheadAttention) else _meta((n, tgt, out_f), q.dtype))
    else:
        out = (_meta((tgt, n, out_f), q.dtype) if isinstance(m, nn.MultiheadAttention)
               else torch.empty_strided((tgt, n, out_f), (out_f, tgt * out_f, 1), dtype=q.dtype, device="meta"))
    weights = None
    if need:
        weights = _meta((n, tgt, src) if avg else (n, h, tgt, src), q.dtype)
    return (out, weights), macs

"""Parameter and MAC counts.

MACs come from `torch.utils.flop_counter.FlopCounterMode` over one forward pass (FLOPs / 2) on
the example inputs (real tensors, see passes/trace.py); it counts at the ATen level, so functional ops (F.conv*, matmul, bmm, einsum, linear,
scaled_dot_product_attention) count the same as modules. Interpolation, which it does not
count, is added here: each output element costs one MAC per source tap (2**d for d-linear,
16 for bicubic, 0 for nearest). So is the CPU kernel of scaled_dot_product_attention
(`_scaled_dot_product_flash_attention_for_cpu`), which FlopCounterMode (torch 2.14) counts as
zero: without it, nn.MultiheadAttention's QK^T and AV matmuls were missing from the original's
count but present in the pruned SlimMultiheadAttention's, understating the MAC reduction.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .trace import as_inputs, eval_mode

aten = torch.ops.aten


def _interp(taps: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * taps * math.prod(out_shape)  # FLOPs = 2 * MACs
    return flops


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # tensors arrive as shapes


_CUSTOM = {  # keyed by overload packet, as FlopCounterMode looks them up
    aten.upsample_bilinear2d: _interp(4), aten.upsample_linear1d: _interp(2),
    aten.upsample_trilinear3d: _interp(8), aten.upsample_bicubic2d: _interp(16),
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
}


def count_params(model: torch.nn.Module) -> int:
    return count_module_params(model.modules())


def count_module_params(modules) -> int:
    """The parameters of a model given all its modules (its named_modules() values), each
    counted once, as `parameters()` lists them: its tables read directly (a quarter of the time
    of `parameters()`, whose nested generators walk the module tree)."""
    unique = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
    return sum(p.numel() for p in unique.values())


@contextlib.contextmanager
def unfused_attention():
    """nn.MultiheadAttention's fused fast path off: the fused kernel is one op the counter does
    not know, so with it on attention would count as zero MACs."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def new_counter() -> FlopCounterMode:
    """A FlopCounterMode with passes' additions (interpolation, the CPU attention kernel)."""
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM)


@contextlib.contextmanager
def macs_counter():
    """A FlopCounterMode active for the duration, attention unfused."""
    with unfused_attention(), new_counter() as fc:
        yield fc


def macs_of(counter: FlopCounterMode) -> int:
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """No parameter requires grad for the duration (flags restored after). FlopCounterMode's
    module tracker hooks every module input that requires grad, and a view of a parameter
    made under no_grad (timm's CaiT expands its class token) requires grad without having a
    gradient function, which the hook asserts on."""
    flags = [p for p in model.parameters() if p.requires_grad]
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flags:
            p.requires_grad_(True)


def count_macs(model: torch.nn.Module, example_inputs) -> int:
    inputs = as_inputs(example_inputs)
    with eval_mode(model), torch.no_grad(), _frozen(model), macs_counter() as fc:
        model(*inputs)
    return macs_of(fc)


def count(model: torch.nn.Module, example_inputs) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward pass on `example_inputs`."""
    return count_params(model), count_macs(model, example_inputs)

"""Parameter and MAC counts.

MACs come from `torch.utils.flop_counter.FlopCounterMode` over one forward pass (FLOPs / 2),\nrun on fake tensors so that nothing is computed:
it counts at the ATen level, so functional ops (F.conv*, matmul, bmm, einsum, linear,
scaled_dot_product_attention) count the same as modules. Interpolation, which it does not
count, is added here: each output element costs one MAC per source tap (2**d for d-linear,
16 for bicubic, 0 for nearest).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .trace import as_inputs, eval_mode

aten = torch.ops.aten


def _interp(taps: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * taps * math.prod(out_shape)  # FLOPs = 2 * MACs
    return flops


_CUSTOM = {  # keyed by overload packet, as FlopCounterMode looks them up
    aten.upsample_bilinear2d: _interp(4), aten.upsample_linear1d: _interp(2),
    aten.upsample_trilinear3d: _interp(8), aten.upsample_bicubic2d: _interp(16),
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def macs_counter():
    """FlopCounterMode with nn.MultiheadAttention's fused fast path off: the fused kernel is
    one op the counter does not know, so with it on attention would count as zero MACs."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
            yield fc
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def macs_of(counter: FlopCounterMode) -> int:
    return counter.get_total_flops() // 2


def count_macs(model: torch.nn.Module, example_inputs) -> int:
    inputs = as_inputs(example_inputs)
    with eval_mode(model), torch.no_grad(), macs_counter() as fc:
        model(*inputs)
    return macs_of(fc)


def count(model: torch.nn.Module, example_inputs) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward pass on `example_inputs`."""
    return count_params(model), count_macs(model, example_inputs)

"""Parameter and MAC counts.

MACs come from `torch.utils.flop_counter.FlopCounterMode` over one forward pass (FLOPs / 2):
it counts at the ATen level, so functional ops (F.conv*, matmul, bmm, einsum, linear,
scaled_dot_product_attention) count the same as modules. Interpolation, which it does not
count, is added here: each output element costs one MAC per source tap (2**d for d-linear,
16 for bicubic, 0 for nearest).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .trace import as_inputs, eval_mode

aten = torch.ops.aten


def _interp(taps: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * taps * math.prod(out_shape)  # FLOPs = 2 * MACs
    return flops


_CUSTOM = {
    aten.upsample_bilinear2d.default: _interp(4), aten.upsample_bilinear2d.vec: _interp(4),
    aten.upsample_linear1d.default: _interp(2), aten.upsample_linear1d.vec: _interp(2),
    aten.upsample_trilinear3d.default: _interp(8), aten.upsample_trilinear3d.vec: _interp(8),
    aten.upsample_bicubic2d.default: _interp(16), aten.upsample_bicubic2d.vec: _interp(16),
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, example_inputs) -> int:
    inputs = as_inputs(example_inputs)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
        model(*inputs)
    return fc.get_total_flops() // 2


def count(model: torch.nn.Module, example_inputs) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward pass on `example_inputs`."""
    return count_params(model), count_macs(model, example_inputs)

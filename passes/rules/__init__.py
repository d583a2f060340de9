"""The one table: op -> rule (how channel labels flow through it, how the rewrite fixes it).

Keys are the canonical op vocabulary of a torch.fx graph: a function object for
`call_function` nodes, a method name for `call_method` nodes, an nn.Module class for
`call_module` nodes (looked up along the class's MRO, so subclasses inherit rules). Each rule
is a `Rule(labels, rewrite, shape_args)`:

- `labels(ctx, node)` returns the labels of the node's output from its inputs' labels,
  unifying and pinning atoms through `ctx` (see `passes.channels.Ctx`);
- `rewrite(rctx, node)` runs after parameters are sliced and adjusts what the slicing alone
  does not: literal sizes in the graph, module attributes, replaced modules;
- `shape_args` says the node may take channel counts as shape arguments (a view size, a slice
  bound) and stays correct when they shrink; any other node that receives a channel count as
  a number pins those channels.

There is no registration at import time: the table below is the whole list. An op that is
not in it gets `UNKNOWN`, which pins every channel it touches and says so in the report.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import UNKNOWN, Rule, non_tensor, placeholder, output, get_attr
from . import elementwise as E
from . import shape as S
from . import layers as Ly
from . import reduce as R
from . import attention as A
from . import mvit as MV
from ..modules import SlimMultiheadAttention
from ..ops import window_attention, window_attention_3d

try:  # torchvision's fx-wrapped helpers (present when torchvision is)
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth
    from torchvision.models import swin_transformer as _tv_swin
    from torchvision.models.video import mvit as _tv_mvit
    from torchvision.models.video import swin_transformer as _tv_swin3d
    _TORCHVISION = {
        _tv_stochastic_depth: E.UNARY,
        _tv_swin._patch_merging_pad: S.TILE_LAST,
        _tv_swin.shifted_window_attention: A.WINDOW_ATTENTION,
        _tv_swin3d.shifted_window_attention_3d: A.WINDOW_ATTENTION_3D,
        _tv_mvit._unsqueeze: MV.UNSQUEEZE, _tv_mvit._squeeze: MV.SQUEEZE,
        _tv_mvit._add_shortcut: MV.ADD_SHORTCUT, _tv_mvit._add_rel_pos: MV.ADD_REL_POS,
    }
except ImportError:  # pragma: no cover - torchvision is a dependency
    _TORCHVISION = {}

FUNCTIONS: dict = {
    # elementwise
    operator.add: E.ARITH, operator.sub: E.ARITH, operator.mul: E.ARITH, operator.truediv: E.ARITH,
    operator.floordiv: E.ARITH, operator.mod: E.ARITH, operator.pow: E.ARITH, operator.neg: E.ARITH,
    operator.eq: E.ARITH, operator.ne: E.ARITH, operator.lt: E.ARITH, operator.le: E.ARITH,
    operator.gt: E.ARITH, operator.ge: E.ARITH,
    torch.add: E.BINARY, torch.sub: E.BINARY, torch.mul: E.BINARY, torch.div: E.BINARY,
    torch.maximum: E.BINARY, torch.minimum: E.BINARY, torch.where: E.BINARY,
    torch.pow: E.BINARY, torch.masked_fill: E.BINARY,
    torch.relu: E.UNARY, torch.sigmoid: E.UNARY, torch.tanh: E.UNARY, torch.exp: E.UNARY,
    torch.sqrt: E.UNARY, torch.rsqrt: E.UNARY, torch.abs: E.UNARY, torch.neg: E.UNARY,
    torch.clamp: E.UNARY, torch.clip: E.UNARY, torch.sin: E.UNARY, torch.cos: E.UNARY,
    torch.erf: E.UNARY, torch.log: E.UNARY, torch.square: E.UNARY,
    torch.zeros_like: E.UNARY, torch.ones_like: E.UNARY, torch.empty_like: E.UNARY,
    torch.full_like: E.UNARY, torch.rand_like: E.UNARY, torch.randn_like: E.UNARY,
    F.relu: E.UNARY, F.relu6: E.UNARY, F.gelu: E.UNARY, F.silu: E.UNARY, F.mish: E.UNARY,
    F.hardswish: E.UNARY, F.hardsigmoid: E.UNARY, F.hardtanh: E.UNARY, F.leaky_relu: E.UNARY,
    F.elu: E.UNARY, F.selu: E.UNARY, F.softplus: E.UNARY, F.sigmoid: E.UNARY, F.tanh: E.UNARY,
    F.dropout: E.UNARY, F.dropout1d: E.UNARY, F.dropout2d: E.UNARY, F.dropout3d: E.UNARY,
    F.alpha_dropout: E.UNARY,
    # shapes and data movement
    operator.getitem: S.GETITEM, getattr: S.GETATTR,
    torch.flatten: S.RESHAPE, torch.reshape: S.RESHAPE, torch.squeeze: S.RESHAPE,
    torch.unsqueeze: S.RESHAPE, torch.unflatten: S.RESHAPE,
    torch.permute: S.PERMUTE, torch.transpose: S.TRANSPOSE, torch.swapaxes: S.TRANSPOSE,
    torch.swapdims: S.TRANSPOSE,
    torch.cat: S.CAT, torch.concat: S.CAT, torch.concatenate: S.CAT, torch.stack: S.STACK,
    torch.split: S.SPLIT, torch.chunk: S.SPLIT, torch.tensor_split: S.SPLIT, torch.unbind: S.UNBIND,
    torch.repeat_interleave: S.REPEAT_INTERLEAVE,
    torch.zeros: S.CREATE, torch.ones: S.CREATE, torch.empty: S.CREATE, torch.full: S.FULL,
    torch.arange: S.CREATE, torch.rand: S.CREATE, torch.randn: S.CREATE,
    torch._assert: non_tensor, len: S.LEN,
    F.interpolate: S.KEEP_LEADING, F.pad: S.PAD, torch.roll: S.ROLL,
    # layers as functions
    F.linear: Ly.LINEAR_FN, F.conv1d: Ly.CONV_FN, F.conv2d: Ly.CONV_FN, F.conv3d: Ly.CONV_FN,
    F.batch_norm: Ly.BATCH_NORM_FN, F.layer_norm: Ly.LAYER_NORM_FN, F.group_norm: Ly.GROUP_NORM_FN,
    F.adaptive_avg_pool1d: S.KEEP_LEADING, F.adaptive_avg_pool2d: S.KEEP_LEADING,
    F.adaptive_avg_pool3d: S.KEEP_LEADING, F.adaptive_max_pool2d: S.KEEP_LEADING,
    F.avg_pool1d: S.KEEP_LEADING, F.avg_pool2d: S.KEEP_LEADING, F.avg_pool3d: S.KEEP_LEADING,
    F.max_pool1d: S.KEEP_LEADING, F.max_pool2d: S.KEEP_LEADING, F.max_pool3d: S.KEEP_LEADING,
    torch.max_pool2d: S.KEEP_LEADING, torch.avg_pool1d: S.KEEP_LEADING,
    torch._C._nn.avg_pool2d: S.KEEP_LEADING, torch._C._nn.avg_pool3d: S.KEEP_LEADING,
    # contractions, reductions, attention
    torch.matmul: R.MATMUL, operator.matmul: R.MATMUL, torch.bmm: R.MATMUL, torch.mm: R.MATMUL,
    torch.einsum: R.EINSUM,
    torch.mean: R.MEAN, torch.sum: R.SUM, torch.amax: R.MAX, torch.amin: R.MAX,
    F.normalize: R.NORMALIZE,
    F.softmax: R.SOFTMAX, F.log_softmax: R.SOFTMAX, torch.softmax: R.SOFTMAX,
    F.scaled_dot_product_attention: A.SDPA, window_attention: A.WINDOW_ATTENTION,
    window_attention_3d: A.WINDOW_ATTENTION_3D,
    **_TORCHVISION,
}

METHODS: dict = {
    "add": E.BINARY, "sub": E.BINARY, "mul": E.BINARY, "div": E.BINARY, "pow": E.BINARY,
    "masked_fill": E.BINARY, "add_": E.BINARY, "mul_": E.BINARY, "type_as": E.UNARY,
    "relu": E.UNARY, "sigmoid": E.UNARY, "tanh": E.UNARY, "exp": E.UNARY, "sqrt": E.UNARY,
    "rsqrt": E.UNARY, "abs": E.UNARY, "neg": E.UNARY, "clamp": E.UNARY, "clip": E.UNARY,
    "relu_": E.UNARY, "sigmoid_": E.UNARY, "clamp_": E.UNARY,
    "contiguous": E.UNARY, "clone": E.UNARY, "detach": E.UNARY, "to": E.UNARY, "float": E.UNARY,
    "half": E.UNARY, "double": E.UNARY, "type": E.UNARY, "requires_grad_": E.UNARY,
    "view": S.RESHAPE, "reshape": S.RESHAPE, "flatten": S.RESHAPE, "unflatten": S.RESHAPE,
    "squeeze": S.RESHAPE, "unsqueeze": S.RESHAPE, "view_as": S.RESHAPE, "reshape_as": S.RESHAPE,
    "permute": S.PERMUTE, "transpose": S.TRANSPOSE, "swapaxes": S.TRANSPOSE, "swapdims": S.TRANSPOSE,
    "expand": S.EXPAND, "expand_as": S.EXPAND, "repeat": S.REPEAT,
    "repeat_interleave": S.REPEAT_INTERLEAVE,
    "roll": S.ROLL, "split": S.SPLIT, "chunk": S.SPLIT, "tensor_split": S.SPLIT, "unbind": S.UNBIND,
    "size": S.SIZE, "dim": non_tensor, "numel": S.NUMEL,
    "new_zeros": S.CREATE, "new_ones": S.CREATE, "new_empty": S.CREATE, "new_full": S.FULL,
    "mean": R.MEAN, "sum": R.SUM, "amax": R.MAX, "amin": R.MAX,
    "softmax": R.SOFTMAX, "log_softmax": R.SOFTMAX,
    "matmul": R.MATMUL, "bmm": R.MATMUL,
}

MODULES: dict = {
    nn.Conv1d: Ly.CONV, nn.Conv2d: Ly.CONV, nn.Conv3d: Ly.CONV,
    nn.ConvTranspose1d: Ly.CONV_T, nn.ConvTranspose2d: Ly.CONV_T, nn.ConvTranspose3d: Ly.CONV_T,
    nn.Linear: Ly.LINEAR, nn.Bilinear: UNKNOWN, nn.Embedding: Ly.EMBEDDING,
    nn.BatchNorm1d: Ly.BATCH_NORM, nn.BatchNorm2d: Ly.BATCH_NORM, nn.BatchNorm3d: Ly.BATCH_NORM,
    nn.InstanceNorm1d: Ly.INSTANCE_NORM, nn.InstanceNorm2d: Ly.INSTANCE_NORM,
    nn.InstanceNorm3d: Ly.INSTANCE_NORM,
    nn.LayerNorm: Ly.LAYER_NORM, nn.GroupNorm: Ly.GROUP_NORM, nn.PReLU: Ly.PRELU,
    nn.MultiheadAttention: A.MHA, SlimMultiheadAttention: A.MHA,
    nn.ReLU: E.UNARY, nn.ReLU6: E.UNARY, nn.GELU: E.UNARY, nn.SiLU: E.UNARY, nn.Mish: E.UNARY,
    nn.Hardswish: E.UNARY, nn.Hardsigmoid: E.UNARY, nn.Hardtanh: E.UNARY, nn.Sigmoid: E.UNARY,
    nn.Tanh: E.UNARY, nn.LeakyReLU: E.UNARY, nn.ELU: E.UNARY, nn.SELU: E.UNARY, nn.CELU: E.UNARY,
    nn.Softplus: E.UNARY, nn.Identity: E.UNARY, nn.Dropout: E.UNARY, nn.Dropout1d: E.UNARY,
    nn.Dropout2d: E.UNARY, nn.Dropout3d: E.UNARY, nn.AlphaDropout: E.UNARY,
    nn.MaxPool1d: S.KEEP_LEADING, nn.MaxPool2d: S.KEEP_LEADING, nn.MaxPool3d: S.KEEP_LEADING,
    nn.AvgPool1d: S.KEEP_LEADING, nn.AvgPool2d: S.KEEP_LEADING, nn.AvgPool3d: S.KEEP_LEADING,
    nn.AdaptiveAvgPool1d: S.KEEP_LEADING, nn.AdaptiveAvgPool2d: S.KEEP_LEADING,
    nn.AdaptiveAvgPool3d: S.KEEP_LEADING, nn.AdaptiveMaxPool1d: S.KEEP_LEADING,
    nn.AdaptiveMaxPool2d: S.KEEP_LEADING, nn.AdaptiveMaxPool3d: S.KEEP_LEADING,
    nn.Upsample: S.KEEP_LEADING, nn.UpsamplingNearest2d: S.KEEP_LEADING,
    nn.UpsamplingBilinear2d: S.KEEP_LEADING,
    nn.Flatten: S.RESHAPE, nn.Unflatten: S.RESHAPE, nn.ChannelShuffle: S.CHANNEL_SHUFFLE,
    nn.Softmax: R.SOFTMAX, nn.LogSoftmax: R.SOFTMAX,
}
MODULES.update({getattr(nn, f"{kind}Pad{d}d"): S.PAD  # their forward is F.pad(x, self.padding, ...)
                for kind in ("Constant", "Zero", "Reflection", "Replication", "Circular") for d in (1, 2, 3)
                if hasattr(nn, f"{kind}Pad{d}d")})

NODE_OPS = {"placeholder": placeholder, "output": output, "get_attr": get_attr}


def rule_for(node: fx.Node, ctx) -> Rule:
    if node.op in NODE_OPS:
        return NODE_OPS[node.op]
    if node.op == "call_function":
        return FUNCTIONS.get(node.target, UNKNOWN)
    if node.op == "call_method":
        return METHODS.get(node.target, UNKNOWN)
    module = ctx.modules[node.target]
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls]
    return UNKNOWN

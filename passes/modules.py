"""Modules the rewrite puts in place of ones whose attributes cannot express a pruned shape.

`SlimMultiheadAttention` replaces `nn.MultiheadAttention` after pruning. nn.MultiheadAttention
ties the query width, the q/k head width, the v head width and the output width to one
`embed_dim`; once pruned they differ. This module keeps nn.MultiheadAttention's parameter
names (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`, `out_proj.bias`), call signature
and return value `(output, weights)`, and keeps the original softmax scale, so a pruned model
equals the masked original. It exports to ONNX as plain MatMul/Softmax ops.

Also here: `module_attr`, the attribute read of a module that the tracer, the shape formulas
and the report use in place of getattr.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def module_attr(m: nn.Module, name: str, *default):
    """getattr(m, name[, default]), with a parameter, buffer, submodule or plain attribute read
    from its table directly: a name nn.Module.__getattr__ would look up costs no Python call,
    and a missing one with a default no caught AttributeError. A name the class has (a
    property, as parametrizations add) goes through getattr, and so does a missing name of a
    class with its own __getattr__."""
    if name in m.__dict__:
        return m.__dict__[name]
    kind = type(m)
    if not hasattr(kind, name):
        for table in (m._parameters, m._buffers, m._modules):
            if name in table:
                return table[name]
        if default and kind.__getattr__ is _MODULE_GETATTR:  # nn.Module's would raise AttributeError
            return default[0]
    return getattr(m, name, *default)


_MODULE_GETATTR = nn.Module.__getattr__


def _param(t: torch.Tensor) -> nn.Parameter:
    """A Parameter is taken as it is (the rewrite hands over the freshly sliced one, so ties to
    other modules survive and nothing is copied); a plain tensor is copied into a new one."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach().clone())


class SlimMultiheadAttention(nn.Module):
    def __init__(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None,
                 out_proj: nn.Linear, num_heads: int, qk_head_dim: int, v_head_dim: int,
                 scale: float, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        self.in_proj_weight = _param(in_proj_weight)
        self.in_proj_bias = None if in_proj_bias is None else _param(in_proj_bias)
        self.out_proj = out_proj
        self.num_heads, self.qk_head_dim, self.v_head_dim = num_heads, qk_head_dim, v_head_dim
        self.embed_dim = in_proj_weight.shape[1]
        self.scale, self.dropout, self.batch_first = scale, dropout, batch_first

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, qk_head_dim={self.qk_head_dim}, "
                f"v_head_dim={self.v_head_dim}, out={self.out_proj.out_features}, batch_first={self.batch_first}")

    def _proj(self, x: torch.Tensor, start: int, width: int) -> torch.Tensor:
        w = self.in_proj_weight[start:start + width]
        b = None if self.in_proj_bias is None else self.in_proj_bias[start:start + width]
        y = F.linear(x, w, b)  # [B, T, H*d]
        return y.view(y.shape[0], y.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        batch = 0 if self.batch_first else 1  # an unbatched call is a batch of one, at this dim
        if unbatched:
            query, key, value = query.unsqueeze(batch), key.unsqueeze(batch), value.unsqueeze(batch)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        hq = self.num_heads * self.qk_head_dim
        q = self._proj(query, 0, hq)
        k = self._proj(key, hq, hq)
        v = self._proj(value, 2 * hq, self.num_heads * self.v_head_dim)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, L, S]
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(q.shape[0], self.num_heads, *attn_mask.shape[-2:])
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        if is_causal and attn_mask is None:
            L, S = scores.shape[-2:]
            causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, -1)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2)  # [B, L, H, dv]
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(batch)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

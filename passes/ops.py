"""Functions the rewrite puts in place of fx-wrapped functions whose signature ties widths together.

`window_attention` replaces torchvision's `shifted_window_attention` (Swin v1 and v2), and
`window_attention_3d` its video Swin's `shifted_window_attention_3d`. The originals derive the q/k/v head width, the output width and the softmax scale from the input's
channel count C, so none of them can shrink on their own. This version reads every width from
the weights it is given and takes the q/k head width, v head width and scale explicitly; with
the original values it computes the same function. It is fx-wrapped (one opaque node when a
pruned model is traced again) and exports to ONNX through the ordinary ops it is made of.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F


def _window_mask(pad_h: int, pad_w: int, window: list, shift: list, device) -> torch.Tensor:
    """Attention mask for shifted windows: -100 between tokens from different regions."""
    region = torch.zeros(pad_h, pad_w, device=device)
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h0:h1, w0:w1] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _attend(x, qkv_weight, qkv_bias, proj_weight, proj_bias, position_bias, mask, heads: int, qk_head_dim: int,
            v_head_dim: int, scale: float, attention_dropout: float, dropout: float, training: bool,
            logit_scale=None) -> torch.Tensor:
    """Multi-head self-attention within windows: x [windows*B, tokens, C_in] -> [.., C_out].
    `mask` [windows, tokens, tokens] (shifted windows) or None; `logit_scale`: Swin v2's cosine
    attention (whose key projection has no bias)."""
    n, tokens = x.shape[:2]
    qk, vw = heads * qk_head_dim, heads * v_head_dim
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:qk], torch.zeros_like(qkv_bias[qk:2 * qk]), qkv_bias[2 * qk:]])
    q, k, v = F.linear(x, qkv_weight, qkv_bias).split([qk, qk, vw], dim=-1)
    q = q.reshape(n, tokens, heads, qk_head_dim).transpose(1, 2)
    k = k.reshape(n, tokens, heads, qk_head_dim).transpose(1, 2)
    v = v.reshape(n, tokens, heads, v_head_dim).transpose(1, 2)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=4.605170185988092).exp()  # log(100)
    else:
        attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + position_bias
    if mask is not None:
        attn = attn.view(-1, mask.shape[0], heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(n, tokens, vw)
    return F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)


def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: list, num_heads: int,
                     shift_size: list, attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias=None, proj_bias=None, logit_scale=None, training: bool = True, *,
                     qk_head_dim: int, v_head_dim: int, scale: float) -> torch.Tensor:
    """(Shifted) window multi-head self-attention over x [B, H, W, C_in] -> [B, H, W, C_out]."""
    b, h, w, _ = x.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, c_in = x.shape
    shift = [0 if window_size[0] >= ph else shift_size[0], 0 if window_size[1] >= pw else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // window_size[0], pw // window_size[1]
    x = x.view(b, nh, window_size[0], nw, window_size[1], c_in).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * nh * nw, window_size[0] * window_size[1], c_in)

    mask = _window_mask(ph, pw, window_size, shift, x.device) if sum(shift) > 0 else None
    x = _attend(x, qkv_weight, qkv_bias, proj_weight, proj_bias, relative_position_bias, mask, num_heads,
                qk_head_dim, v_head_dim, scale, attention_dropout, dropout, training, logit_scale)
    c_out = x.shape[-1]
    x = x.view(b, nh, nw, window_size[0], window_size[1], c_out).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, ph, pw, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_attention")


def window_attention_3d(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                        relative_position_bias: torch.Tensor, window_size: list, num_heads: int,
                        shift_size: list, attention_dropout: float = 0.0, dropout: float = 0.0,
                        qkv_bias=None, proj_bias=None, training: bool = True, *,
                        qk_head_dim: int, v_head_dim: int, scale: float) -> torch.Tensor:
    """(Shifted) 3-D window multi-head self-attention over x [B, T, H, W, C_in] -> [B, T, H, W, C_out]."""
    from torchvision.models.video.swin_transformer import _compute_attention_mask_3d

    b, t, h, w, _ = x.shape
    win = [int(s) for s in window_size]
    pad = [(win[i] - size % win[i]) % win[i] for i, size in enumerate((t, h, w))]
    x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    _, pt, ph, pw, c_in = x.shape
    shift = [int(s) for s in shift_size]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
    nt, nh, nw = pt // win[0], ph // win[1], pw // win[2]
    x = x.view(b, nt, win[0], nh, win[1], nw, win[2], c_in).permute(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b * nt * nh * nw, win[0] * win[1] * win[2], c_in)

    mask = _compute_attention_mask_3d(x, (pt, ph, pw), tuple(win), tuple(shift)) if sum(shift) > 0 else None
    x = _attend(x, qkv_weight, qkv_bias, proj_weight, proj_bias, relative_position_bias, mask, num_heads,
                qk_head_dim, v_head_dim, scale, attention_dropout, dropout, training)
    c_out = x.shape[-1]
    x = x.view(b, nt, nh, nw, win[0], win[1], win[2], c_out).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(b, pt, ph, pw, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


torch.fx.wrap("window_attention_3d")

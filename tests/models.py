"""Small hand-built models, one per structure the channel analysis must handle."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(i, o, k=3, **kw):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(o), nn.ReLU())


class MnistNet(nn.Module):
    """The classic PyTorch MNIST example, literal `view(-1, 320)` included."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Sequential(cbr(16, 32), nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b = nn.Sequential(cbr(16, 24), nn.Conv2d(24, 16, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = x + self.b(x)
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """cat on the channel dim (offsets) and on a spatial dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(3, 12), cbr(3, 16)
        self.mix = cbr(20, 16, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = self.mix(y)
        z = torch.cat([y, self.c(x) + y[:, :8].repeat(1, 2, 1, 1)], dim=2)  # spatial cat
        return self.out(z)


class Split(nn.Module):
    """split with unequal sizes, chunk, and constant slicing."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24)
        self.p = cbr(6, 8)
        self.q = cbr(10, 8)
        self.r = cbr(8, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b, c = torch.split(x, [6, 10, 8], dim=1)
        h1, h2 = self.r(c).chunk(2, dim=1)
        s = x[:, 16:24]
        y = self.p(a) + self.q(b) + torch.cat([h1, h2], 1) + s
        return self.out(y)


class SplitRepeat(nn.Module):
    """tensor_split at an index on channels (the rewrite gives it the pruned section sizes),
    repeat_interleave along a spatial dim (channels stay free) and along channels (pinned)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = cbr(6, 8)
        self.b = cbr(10, 8)
        self.c = cbr(8, 4)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        a, b = torch.tensor_split(self.stem(x), (6,), dim=1)
        y = (self.a(a) + self.b(b)).repeat_interleave(2, dim=3)
        return self.out(y + self.c(y).repeat_interleave(2, dim=1))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = cbr(3, 12)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.f(x), 4)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branch = nn.Sequential(cbr(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), cbr(8, 8, 1))
        self.branch2 = nn.Sequential(cbr(8, 8, 1), cbr(8, 8, 1))
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([x1, self.branch2(x2)], 1), 2)
        return self.out(x)


class Grouped(nn.Module):
    """depthwise, depthwise with multiplier, and grouped convs."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.dwm = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.g = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.out = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.out(self.g(self.dwm(self.dw(self.stem(x)))))


class Norms(nn.Module):
    """BatchNorm, GroupNorm, LayerNorm over channels-last (permute), InstanceNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c3 = nn.Conv2d(16, 24, 1)
        self.ln = nn.LayerNorm(24)
        self.c4 = nn.Conv2d(24, 24, 1)
        self.inn = nn.InstanceNorm2d(24, affine=True)
        self.out = nn.Conv2d(24, 3, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.gn(self.c2(x)))
        x = self.c3(x).permute(0, 2, 3, 1)
        x = self.ln(x).permute(0, 3, 1, 2)
        return self.out(F.relu(self.inn(self.c4(x))))


class NormsChannelGroups(Norms):
    """Norms with one channel per GroupNorm group: per-channel statistics, the group count
    follows the channels."""

    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(16, 16)  # one channel per group: per-channel statistics


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = cbr(3, 32)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.c(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s)


class Shared(nn.Module):
    """One module called twice: both calls see the same pruned channels."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.shared = cbr(16, 16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = self.a(x)
        return self.out(self.shared(self.shared(x)))


class LooseParams(nn.Module):
    """Class token, position embedding, layer scale: parameters used outside any layer."""

    def __init__(self, dim=32, tokens=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 7)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


class HandAttention(nn.Module):
    """Hand-written multi-head attention with literal head sizes in view/reshape."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.scale = self.hd ** -0.5
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):  # x: [B, N, 6]
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, 32)
        x = x + self.proj(y)
        return self.head(x.mean(1))


class SdpaAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.embed = nn.Linear(6, dim)
        self.head = nn.Linear(dim, 5)
        self.h = heads

    def forward(self, x):
        x = self.embed(x)
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.h, -1).transpose(1, 2)
        k = self.k(x).view(B, N, self.h, -1).transpose(1, 2)
        v = self.v(x).view(B, N, self.h, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.head(self.o(y).mean(1))


class RegisterTokens(nn.Module):
    """Register tokens (a parameter's rows joined to the sequence, as timm's NaFlexViT and
    ViTs with registers) before attention: the registers are channels of that parameter, but
    tokens are not pruned (attention pins its sequences). `causal`: is_causal=True. `mha`:
    nn.MultiheadAttention instead of scaled_dot_product_attention ("weights": its attention
    weights are used too; "padding": called with a key padding mask, the second input), with
    `batch_first`."""

    def __init__(self, dim=32, heads=4, registers=4, causal=False, mha=None, batch_first=True):
        super().__init__()
        self.h, self.r, self.causal, self.mha, self.batch_first = heads, registers, causal, mha, batch_first
        self.embed = nn.Linear(6, dim)
        self.registers = nn.Parameter(torch.randn(1, registers, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first) if mha else None
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x, padding=None):
        t = torch.cat([self.registers.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        B, N, D = t.shape
        if self.attn is not None:
            s = t if self.batch_first else t.transpose(0, 1)
            y, w = self.attn(s, s, s, key_padding_mask=padding, need_weights=self.mha == "weights")
            t = t + self.proj(y if self.batch_first else y.transpose(0, 1))
            out = self.head(t[:, self.r:].mean(1))
            return out + w.sum(-1).mean(1, keepdim=True) if self.mha == "weights" else out  # rows sum to 1
        q, k, v = self.qkv(t).reshape(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        t = t + self.proj(y.transpose(1, 2).reshape(B, N, D))
        return self.head(t[:, self.r:].mean(1))


class SizedZeros(nn.Module):
    """A channel count sizes a new tensor (`y.new_zeros(B, C)`), which is joined to the
    channels: its dim is not a channel and would shrink with the count, so the count is pinned."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.b(self.a(x)).mean((2, 3))
        return self.fc(torch.cat([y, y.new_zeros(y.shape[0], y.shape[1])], 1))


class RotaryAttention(nn.Module):
    """EVA-style attention: rotary position embedding on q and k (adjacent pairs of each head
    rotated, per-position tables), a literal head count, the width read back from the input."""

    def __init__(self, dim=32, heads=4, n=10):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        angle = torch.arange(n)[:, None] * torch.linspace(0.1, 1.0, dim // heads // 2).repeat_interleave(2)
        self.register_buffer("cos", angle.cos())  # [n, head width]
        self.register_buffer("sin", angle.sin())

    @staticmethod
    def rotate(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def forward(self, x):  # x: [B, n, 6]
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 4, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.cos + self.rotate(q) * self.sin
        k = k * self.cos + self.rotate(k) * self.sin
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head((x + self.proj(y)).mean(1))


class NormalizeRoll(nn.Module):
    """F.normalize over channels, torch.roll over space (shifted windows) and over channels."""

    def __init__(self):
        super().__init__()
        self.a, self.c = cbr(3, 16), cbr(3, 8)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        a = torch.roll(F.normalize(self.a(x), dim=1), (1, -2), (2, 3))
        c = self.c(x).roll(1, 1)  # along the channels: pinned
        return self.out(torch.cat([self.b(a), c], 1)).mean((2, 3))


class MHA(nn.Module):
    """`unbatched`: called with one (L, 6) sequence, which nn.MultiheadAttention takes whatever
    its batch_first."""

    def __init__(self, dim=32, heads=4, batch_first=True, unbatched=False):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)
        self.swap = not batch_first and not unbatched
        self.unbatched = unbatched

    def forward(self, x):
        x = self.embed(x)
        if self.swap:
            x = x.transpose(0, 1)
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(x)
        if self.swap:
            x = x.transpose(0, 1)
        return self.head(x[0] if self.unbatched else x[:, 0])


class Transformer(nn.Module):
    """nn.TransformerEncoder (+ optional nn.TransformerDecoder over the encoder's output)."""

    def __init__(self, batch_first=True, norm_first=False, decoder=False):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.dec = (nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 48, batch_first=batch_first,
                                                                     norm_first=norm_first, activation="gelu"), 1)
                    if decoder else None)
        self.head = nn.Linear(32, 5)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        y = self.enc(h)
        if self.dec is not None:
            y = self.dec(h, y)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


class Convs(nn.Module):
    """Conv1d, Conv3d, ConvTranspose2d and PReLU."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.p1 = nn.PReLU(16)
        self.c1b = nn.Conv1d(16, 8, 1)
        self.c3 = nn.Conv3d(2, 12, 3, padding=1)
        self.c3b = nn.Conv3d(12, 4, 1)
        self.ct = nn.ConvTranspose2d(4, 12, 2, stride=2)
        self.ctb = nn.Conv2d(12, 3, 1)

    def forward(self, a, b):
        a = self.c1b(self.p1(self.c1(a)))
        b = self.c3b(F.relu(self.c3(b)))  # [B, 4, D, H, W]
        c = self.ctb(F.relu(self.ct(b.mean(2))))
        return a, c


class Pools(nn.Module):
    """Max/avg pooling (ceil mode, padding, dilation, 1-d and 3-d), adaptive pooling with a kept
    size, and flatten as a function, a method and a module."""

    def __init__(self):
        super().__init__()
        self.c = cbr(3, 8)
        self.p1 = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.p2 = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.p3 = nn.MaxPool2d(2, stride=1, dilation=2)
        self.a = nn.AdaptiveAvgPool2d((3, None))
        self.c1 = nn.Conv1d(8, 8, 3)
        self.p4 = nn.MaxPool1d(2, ceil_mode=True)
        self.p5 = nn.AvgPool1d(3, 1, 1)
        self.c3 = nn.Conv3d(8, 6, 1)
        self.p6 = nn.MaxPool3d((1, 2, 2), padding=(0, 1, 1))
        self.a3 = nn.AdaptiveAvgPool3d(1)
        self.f = nn.Flatten()
        self.fc = nn.Linear(8 * 4 + 6, 10)

    def forward(self, x):
        x = self.p3(self.p2(self.p1(self.c(x))))  # [B, 8, 3, 3]
        v = self.c3(x.unsqueeze(2))  # [B, 6, 1, 3, 3]
        v = torch.flatten(self.a3(self.p6(v)), 1)  # [B, 6]
        y = torch.flatten(self.a(x), 2)  # [B, 8, 9]
        y = self.p5(self.p4(self.c1(y)))  # [B, 8, 4]
        return self.fc(torch.cat([self.f(y), v.flatten(1)], 1))


class ChannelsAsLength(nn.Module):
    """Channels moved into the spatial dim of later layers, as timm's CoaT aggregates feature
    vectors with a Conv1d over their channels: pointwise convs (kernel 1, stride 1, no padding)
    carry them, so they stay prunable; a conv window, a pooling window and an expanded single
    channel pin what they touch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 16)
        self.agg, self.aggt = nn.Conv1d(2, 1, 1), nn.ConvTranspose1d(2, 1, 1)
        self.c = nn.Linear(6, 12)  # into a kernel-3 conv's length dim: pinned
        self.win = nn.Conv1d(1, 2, 3, padding=1)
        self.d = nn.Linear(6, 12)  # into a max pool's length dim: pinned
        self.pool = nn.MaxPool1d(2)
        self.e = nn.Linear(6, 8)  # its channel 0 is expanded: pinned, the rest free
        self.head = nn.Linear(16 + 24 + 6 + 8 + 4, 5)

    def forward(self, x):
        s = torch.stack([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)  # [B, 2, 16]
        y = (self.agg(s) + self.aggt(s)).squeeze(1)  # [B, 16]: the channels of a and b
        w = self.win(self.c(x).unsqueeze(1)).flatten(1)  # [B, 24]
        p = self.pool(self.d(x).unsqueeze(1)).flatten(1)  # [B, 6]
        e = F.relu(self.e(x))
        return self.head(torch.cat([y, w, p, e, e[:, :1].expand(-1, 4)], 1))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.fc = nn.Linear(24, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, ids):
        return self.out(F.relu(self.fc(self.emb(ids)))).mean(1)


class UnknownOp(nn.Module):
    """cumsum over channels has no rule: it must pin those channels, never guess."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = torch.cumsum(self.a(x), dim=1)
        return self.out(self.b(x))


class DictOut(nn.Module):
    """Outputs in a dict (as torchvision's segmentation models return them): never pruned."""

    def __init__(self):
        super().__init__()
        self.body = cbr(3, 16)
        self.head = nn.Conv2d(16, 6, 1)
        self.aux = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.body(x)
        return {"out": F.interpolate(self.head(y), scale_factor=2.0, mode="bilinear"), "aux": self.aux(y)}


def image(c=3, s=16, b=2):
    return torch.randn(b, c, s, s)


# name -> (factory, example inputs)
STRUCTURES = {
    "mnist": (MnistNet, lambda: torch.randn(2, 1, 28, 28)),
    "residual": (Residual, image),
    "concat": (Concat, image),
    "split": (Split, image),
    "split_repeat": (SplitRepeat, image),
    "flatten_linear": (FlattenLinear, image),
    "shuffle": (Shuffle, image),
    "grouped": (Grouped, image),
    "norms": (Norms, image),
    "norms_channel_groups": (NormsChannelGroups, image),
    "squeeze_excite": (SqueezeExcite, image),
    "shared": (Shared, image),
    "loose_params": (LooseParams, image),
    "hand_attention": (HandAttention, lambda: torch.randn(2, 10, 6)),
    "sdpa_attention": (SdpaAttention, lambda: torch.randn(2, 10, 6)),
    "rotary_attention": (RotaryAttention, lambda: torch.randn(2, 10, 6)),
    "register_tokens": (RegisterTokens, lambda: torch.randn(2, 10, 6)),
    "register_tokens_causal": (lambda: RegisterTokens(causal=True), lambda: torch.randn(2, 10, 6)),
    "register_tokens_mha": (lambda: RegisterTokens(mha=True), lambda: torch.randn(2, 10, 6)),
    "register_tokens_mha_seq_first": (lambda: RegisterTokens(mha=True, batch_first=False), lambda: torch.randn(2, 10, 6)),
    "register_tokens_mha_weights": (lambda: RegisterTokens(mha="weights"), lambda: torch.randn(2, 10, 6)),
    "register_tokens_mha_padding": (lambda: RegisterTokens(mha="padding"),
                                    lambda: (torch.randn(2, 10, 6), torch.arange(14).expand(2, 14) >= 12)),
    "sized_zeros": (SizedZeros, image),
    "normalize_roll": (NormalizeRoll, image),
    "mha_batch_first": (MHA, lambda: torch.randn(2, 10, 6)),
    "mha_seq_first": (lambda: MHA(batch_first=False), lambda: torch.randn(2, 10, 6)),
    "mha_unbatched": (lambda: MHA(unbatched=True), lambda: torch.randn(10, 6)),
    "mha_unbatched_seq_first": (lambda: MHA(batch_first=False, unbatched=True), lambda: torch.randn(10, 6)),
    "transformer_encoder": (Transformer, lambda: torch.randn(2, 10, 6)),
    "transformer_seq_first_decoder": (lambda: Transformer(batch_first=False, norm_first=True, decoder=True),
                                      lambda: torch.randn(2, 10, 6)),
    "convs": (Convs, lambda: (torch.randn(2, 4, 20), torch.randn(2, 2, 6, 8, 8))),
    "pools": (Pools, image),
    "channels_as_length": (ChannelsAsLength, lambda: torch.randn(2, 6)),
    "embedding": (Embed, lambda: torch.randint(0, 50, (2, 7))),
    "dict_outputs": (DictOut, image),
}

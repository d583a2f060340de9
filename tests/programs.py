"""The program interpreter behind the fuzz tests: block modules, `Program`, `build`.

A program (see tests/strategies.py, which draws them) is a dict: `inputs` (["image", C] |
["ids", vocab, N] | ["tokens", N, d]), `stem` ({"out": width}), `blocks` ([kind, params] ...)
and optionally `dict_out`. `Program` builds one submodule per block (class `BLOCKS[kind]`,
constructed from the current width and the block's params) and runs them in a Python loop over
the fixed list; torch.fx traces through the loop. `advance` follows widths, spatial size and
token count through the program, so the generator only draws valid blocks. `build(spec, seed)`
gives the model in eval mode with seeded random nonzero parameters and BN statistics, plus its
example inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 2
HW = 8
WMAX = 24  # widths are drawn in 1..WMAX
CATMAX = 40  # cap on concatenated widths


# ------------------------------------------------------------------------------------------
# blocks
def act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
            "tanh": nn.Tanh(), "none": nn.Identity()}[name]


class ConvBlock(nn.Module):
    """conv (module or functional) [+ BN] + activation; groups for depthwise/grouped convs."""

    def __init__(self, c, p):
        super().__init__()
        self.k, self.fn = p.get("k", 3), p.get("fn", False)
        self.stride, self.dil = p.get("stride", 1), p.get("dil", 1)
        self.pad = self.dil * (self.k // 2)
        g = p.get("groups", 1)
        if self.fn:
            self.weight = nn.Parameter(torch.empty(p["out"], c, self.k, self.k))
            self.bias = nn.Parameter(torch.empty(p["out"])) if p.get("bias") else None
        else:
            self.conv = nn.Conv2d(c, p["out"], self.k, stride=self.stride, padding=self.pad, dilation=self.dil,
                                  groups=g, bias=p.get("bias", False))
        bn = p.get("bn")
        self.bn = nn.BatchNorm2d(p["out"], affine=bn != "noaffine") if bn else None
        self.act = act(p.get("act", "none"))

    def forward(self, x):
        if self.fn:
            x = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.pad, dilation=self.dil)
        else:
            x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class Residual(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.a = ConvBlock(c, dict(out=p["mid"], k=3, bn=True, act=p["act"]))
        self.b = ConvBlock(p["mid"], dict(out=p["out"], k=1, bn=True))
        self.proj = nn.Conv2d(c, p["out"], 1) if p["proj"] else None
        self.act = act(p["act"])

    def forward(self, x):
        s = x if self.proj is None else self.proj(x)
        return self.act(s + self.b(self.a(x)))


class Concat(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.keep = p["keep_x"]
        self.branches = nn.ModuleList(ConvBlock(c, dict(out=w, k=1, bn=True, act="relu")) for w in p["widths"])

    def forward(self, x):
        parts = [x] if self.keep else []
        for b in self.branches:
            parts.append(b(x))
        return torch.cat(parts, dim=1)


class SpatialCat(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.dim, self.restore = p["dim"], p["restore"]
        self.conv = ConvBlock(c, dict(out=c, k=3, bn=True, act="relu"))

    def forward(self, x):
        y = torch.cat([x, self.conv(x)], dim=self.dim)
        if self.restore == "slice":
            return y[:, :, ::2] if self.dim == 2 else y[:, :, :, ::2]
        return F.avg_pool2d(y, (2, 1) if self.dim == 2 else (1, 2))


class Split(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.sizes, self.style, self.combine = list(p["sizes"]), p["style"], p["combine"]
        self.bounds = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        self.convs = nn.ModuleList(ConvBlock(s, dict(out=w, k=1, bn=True, act="relu"))
                                   for s, w in zip(self.sizes, p["outs"]))

    def forward(self, x):
        if self.style == "fn":
            parts = torch.split(x, self.sizes, dim=1)
        elif self.style == "method":
            parts = x.split(self.sizes, 1)
        else:
            parts = [x[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        ys = [conv(parts[i]) for i, conv in enumerate(self.convs)]
        if self.combine == "add":
            y = ys[0]
            for t in ys[1:]:
                y = y + t
            return y
        return torch.cat(ys, dim=1)


def chunk_sizes(c: int, n: int) -> list[int]:
    return [len(t) for t in torch.arange(c).chunk(n)]


class Chunk(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.n, self.mode = p["n"], p["mode"]
        sizes = chunk_sizes(c, self.n)
        self.count = len(sizes)
        if self.mode == "branch":  # shufflenet: keep the first chunk, transform the rest
            self.branch = ConvBlock(sizes[1], dict(out=p["out"], k=1, bn=True, act="relu"))
        elif self.mode == "each":
            self.convs = nn.ModuleList(ConvBlock(s, dict(out=p["out"], k=1, bn=True, act="relu")) for s in sizes)

    def forward(self, x):
        if self.mode == "branch":
            a, b = x.chunk(2, dim=1)
            return torch.cat([a, self.branch(b)], 1)
        parts = torch.chunk(x, self.n, dim=1)
        if self.mode == "add":
            y = parts[0]
            for i in range(1, self.count):
                y = y + parts[i]
            return y
        y = self.convs[0](parts[0])
        for i in range(1, self.count):
            y = y + self.convs[i](parts[i])
        return y


class Shuffle(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.g, self.style, self.c, self.h, self.w = p["groups"], p["style"], c, p["h"], p["w"]
        if self.style == "module":
            self.shuffle = nn.ChannelShuffle(self.g)

    def forward(self, x):
        if self.style == "module":
            return self.shuffle(x)
        if self.style == "size":
            b, c, h, w = x.size()
            x = x.view(b, self.g, c // self.g, h, w).transpose(1, 2).contiguous()
            return x.view(b, -1, h, w)
        x = x.view(-1, self.g, self.c // self.g, self.h, self.w).transpose(1, 2)
        return x.reshape(-1, self.c, self.h, self.w)


class SqueezeExcite(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.style, self.c = p["style"], c
        self.gate = nn.Sigmoid() if p["gate"] == "sigmoid" else nn.Hardsigmoid()
        if self.style == "conv":
            self.fc1, self.fc2 = nn.Conv2d(c, p["r"], 1), nn.Conv2d(p["r"], c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, p["r"]), nn.Linear(p["r"], c)

    def forward(self, x):
        if self.style == "conv":
            s = x.mean((2, 3), keepdim=True)
            return x * self.gate(self.fc2(F.relu(self.fc1(s))))
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = self.gate(self.fc2(F.relu(self.fc1(s))))
        if self.style == "literal":
            return x * s.view(-1, self.c, 1, 1)
        return x * s[:, :, None, None]


class Norm(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        kind = p["kind"]
        self.norm = {"gn": lambda: nn.GroupNorm(p.get("groups", 1), c),
                     "in": lambda: nn.InstanceNorm2d(c, affine=True),
                     "prelu": lambda: nn.PReLU(c),
                     "prelu1": lambda: nn.PReLU()}[kind]()
        self.act = act(p.get("act", "none"))

    def forward(self, x):
        return self.act(self.norm(x))


class ChannelsLast(nn.Module):
    """permute to channels-last, LayerNorm over C, optional Linear, permute back."""

    def __init__(self, c, p):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, p["out"]) if p["out"] else None

    def forward(self, x):
        y = self.ln(x.permute(0, 2, 3, 1))
        if self.fc is not None:
            y = F.gelu(self.fc(y))
        return y.permute(0, 3, 1, 2)


class Shared(nn.Module):
    """One module called twice."""

    def __init__(self, c, p):
        super().__init__()
        self.body = ConvBlock(c, dict(out=c, k=p["k"], bn=p["bn"], act="relu"))

    def forward(self, x):
        return self.body(self.body(x))


class Loose(nn.Module):
    """Loose parameters: layer scale (C,1,1) or (1,C,1,1) times a conv, or a position map."""

    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        if self.kind == "pos":
            self.pos = nn.Parameter(torch.empty(1, c, p["h"], p["w"]))
        else:
            self.gamma = nn.Parameter(torch.empty(c, 1, 1) if self.kind == "scale" else torch.empty(1, c, 1, 1))
            self.conv = ConvBlock(c, dict(out=c, k=3, bn=True, act="gelu"))

    def forward(self, x):
        if self.kind == "pos":
            return x + self.pos
        return x + self.gamma * self.conv(x)


class Unruled(nn.Module):
    """An op without a rule over channels: its channels must be pinned, never guessed."""

    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]

    def forward(self, x):
        if self.kind == "cumsum":
            return torch.cumsum(x, dim=1)
        return torch.flip(x, [1])


class Merge(nn.Module):
    """Brings in another image input: conv to the stream's width (add) or to its own width (cat)."""

    def __init__(self, c, p):
        super().__init__()
        self.index, self.mode, self.h = p["input"], p["mode"], p["h"]
        self.conv = ConvBlock(p["cin"], dict(out=c if self.mode == "add" else p["out"], k=3, bn=True, act="relu"))

    def forward(self, x, inputs):
        y = self.conv(inputs[self.index])
        if self.h != HW:
            y = F.adaptive_avg_pool2d(y, self.h)
        return x + y if self.mode == "add" else torch.cat([x, y], 1)


class Pool(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        self.pool = nn.AvgPool2d(2) if self.kind == "avg" else None

    def forward(self, x):
        return self.pool(x) if self.pool is not None else F.max_pool2d(x, 2)


class Fit(nn.Module):
    """Python branches on shapes: odd sizes padded to even ones (as MobileViT and Twins fit a
    patch or window size), and optionally a scale of 1 / the channel count read as an int
    (that count is then pinned)."""

    def __init__(self, c, p):
        super().__init__()
        self.count = p["count"]

    def forward(self, x):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        if self.count:
            x = x * (1.0 / int(x.shape[1]))
        return x


class Tap(nn.Module):
    """An extra model output: the raw tensor (pinned) or a small head on it."""

    def __init__(self, c, p):
        super().__init__()
        self.stage = p["stage"]
        self.fc = nn.Linear(c, p["out"]) if p["out"] else None

    def forward(self, x):
        if self.fc is None:
            return x
        if self.stage == "conv":
            x = x.mean((2, 3))
        elif self.stage == "tok":
            x = x.mean(1)
        return self.fc(x)


class ConvHead(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        self.head = nn.Conv2d(c, p["out"], 1) if self.kind == "conv" else nn.Linear(c, p["out"])

    def forward(self, x):
        if self.kind == "gap":
            return self.head(x.mean((2, 3)))
        if self.kind == "amax":
            return self.head(torch.amax(x, dim=(2, 3)))
        return self.head(x)


class ToVector(nn.Module):
    """adaptive pool to s x s, flatten (torch.flatten / nn.Flatten / literal view(-1, N)), linear."""

    def __init__(self, c, p):
        super().__init__()
        self.s, self.style, self.n = p["s"], p["style"], c * p["s"] * p["s"]
        self.flatten = nn.Flatten() if self.style == "module" else None
        self.fc = nn.Linear(self.n, p["out"])
        self.act = act(p["act"])

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, self.s)
        if self.style == "literal":  # the MNIST idiom (contiguous: a permuted input may be channels-last)
            x = x.contiguous().view(-1, self.n)
        elif self.flatten is not None:
            x = self.flatten(x)
        else:
            x = torch.flatten(x, 1)
        return self.act(self.fc(x))


class ToTokens(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.pool = p["pool"]

    def forward(self, x):
        if self.pool:
            x = F.avg_pool2d(x, 2)
        return x.flatten(2).transpose(1, 2)


class VecBlock(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        if self.kind == "lin":
            self.fc, self.act = nn.Linear(c, p["out"]), act(p["act"])
        elif self.kind == "res":
            self.fc1, self.fc2 = nn.Linear(c, p["out"]), nn.Linear(p["out"], c)
        elif self.kind == "ln":
            self.norm = nn.LayerNorm(c)
        elif self.kind == "len":  # the channels become the length of a 1-channel sequence
            self.op = p["op"]
            self.len_op = {"point": lambda: nn.Conv1d(1, p["m"], 1), "pointT": lambda: nn.ConvTranspose1d(1, p["m"], 1),
                           "window": lambda: nn.Conv1d(1, p["m"], 3, padding=1),
                           "pool": lambda: nn.MaxPool1d(3, 1, 1)}[self.op]()
        else:
            self.norm = nn.BatchNorm1d(c)

    def forward(self, x):
        if self.kind == "lin":
            return self.act(self.fc(x))
        if self.kind == "res":
            return x + self.fc2(F.relu(self.fc1(x)))
        if self.kind == "len":
            return self.len_op(x.unsqueeze(1)).sum(1)  # [B, 1, C] -> [B, m, C] -> [B, C]
        return self.norm(x)


class Mlp(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, p["hidden"]), nn.Linear(p["hidden"], c)
        self.gamma = nn.Parameter(torch.empty(c)) if p["scale"] else None

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.ln(x))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y


class Mha(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.batch_first = p["batch_first"]
        self.ln = nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, p["heads"], batch_first=self.batch_first)

    def forward(self, x):
        y = self.ln(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        y = self.attn(y, y, y, need_weights=False)[0]
        if not self.batch_first:
            y = y.transpose(0, 1)
        return x + y


class TxLayer(nn.Module):
    """nn.TransformerEncoderLayer alone, inside nn.TransformerEncoder, or a
    nn.TransformerDecoderLayer attending to its own input as memory."""

    def __init__(self, c, p):
        super().__init__()
        self.batch_first, self.wrap = p["batch_first"], p["wrap"]
        kw = dict(dim_feedforward=p["ff"], activation=p["act"], batch_first=self.batch_first, norm_first=p["norm_first"])
        if self.wrap == "decoder":
            self.m = nn.TransformerDecoderLayer(c, p["heads"], **kw)
        elif self.wrap == "encoder":
            self.m = nn.TransformerEncoder(nn.TransformerEncoderLayer(c, p["heads"], **kw), p["n"],
                                           enable_nested_tensor=False)
        else:
            self.m = nn.TransformerEncoderLayer(c, p["heads"], **kw)

    def forward(self, x):
        y = x if self.batch_first else x.transpose(0, 1)
        y = self.m(y, y) if self.wrap == "decoder" else self.m(y)
        return y if self.batch_first else y.transpose(0, 1)


class HandAttention(nn.Module):
    """qkv linear, reshape(B, N, 3, heads, hd) with literal heads/hd, softmax(q k^T) v."""

    def __init__(self, c, p):
        super().__init__()
        self.h, self.d = p["heads"], p["hd"]
        self.scale = self.d ** -0.5
        self.qkv = nn.Linear(c, 3 * self.h * self.d)
        self.proj = nn.Linear(self.h * self.d, c)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.h * self.d)
        return x + self.proj(y)


class Sdpa(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.h, self.d, self.dv, self.literal = p["heads"], p["hd"], p["vd"], p["literal"]
        self.q, self.k = nn.Linear(c, self.h * self.d), nn.Linear(c, self.h * self.d)
        self.v, self.o = nn.Linear(c, self.h * self.dv), nn.Linear(self.h * self.dv, c)

    def forward(self, x):
        B, N, _ = x.shape
        if self.literal:
            q = self.q(x).view(B, N, self.h, self.d).transpose(1, 2)
            k = self.k(x).view(B, N, self.h, self.d).transpose(1, 2)
            v = self.v(x).view(B, N, self.h, self.dv).transpose(1, 2)
        else:
            q = self.q(x).view(B, N, self.h, -1).transpose(1, 2)
            k = self.k(x).view(B, N, self.h, -1).transpose(1, 2)
            v = self.v(x).view(B, N, self.h, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return x + self.o(y)


class TokLinear(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.fc, self.act = nn.Linear(c, p["out"]), act(p["act"])

    def forward(self, x):
        return self.act(self.fc(x))


class ClsToken(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.cls = nn.Parameter(torch.empty(1, 1, c))

    def forward(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


class PosEmbed(nn.Module):
    def __init__(self, c, p):
        super().__init__()
        self.pos = nn.Parameter(torch.empty(1, p["n"], c))

    def forward(self, x):
        return x + self.pos


class TokHead(nn.Module):
    """Pool tokens (mean / first) into a linear head, or ("tied") per-token logits through the
    stem embedding's own weight (weight tying; the Program ties it after construction)."""

    def __init__(self, c, p):
        super().__init__()
        self.pool = p["pool"]
        self.fc = nn.Linear(c, p["out"]) if self.pool != "tied" else None
        self.tied = []  # the embedding, kept out of the module tree (a plain list)

    def forward(self, x):
        if self.pool == "tied":
            return F.linear(x, self.tied[0].weight)
        return self.fc(x[:, 0] if self.pool == "first" else x.mean(1))


class Save(nn.Module):
    """Remembers the current tensor for a later Skip (U-Net / DenseNet-style long connections)."""

    def __init__(self, c, p):
        super().__init__()

    def forward(self, x):
        return x


class Skip(nn.Module):
    """Combines a saved tensor with the current one: add (1x1 conv to the current width, or the
    saved tensor itself when widths match) or cat (optionally through a 1x1 conv); pooled to the
    current spatial size when it differs."""

    def __init__(self, c, p):
        super().__init__()
        self.mode, self.pool = p["mode"], p["h"] if p["h"] != p["h_saved"] else None
        self.proj = nn.Conv2d(p["c_saved"], c if self.mode == "add" else p["out"], 1) if p["proj"] else None

    def forward(self, x, saved):
        y = saved
        if self.pool is not None:
            y = F.adaptive_avg_pool2d(y, self.pool)
        if self.proj is not None:
            y = self.proj(y)
        return x + y if self.mode == "add" else torch.cat([x, y], 1)


class ChannelReduce(nn.Module):
    """Reductions over the channel dim: CBAM spatial attention (mean/amax over C) or a softmax over C."""

    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        if self.kind == "spatial":
            self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        if self.kind == "spatial":
            s = torch.cat([x.mean(1, keepdim=True), torch.amax(x, 1, keepdim=True)], dim=1)
            return x * torch.sigmoid(self.conv(s))
        if self.kind == "sum":
            return x * torch.sigmoid(x.sum(1, keepdim=True))
        return x * F.softmax(x, dim=1)


class Up(nn.Module):
    """Upsample then pool back: F.interpolate, or a ConvTranspose2d (stride 2)."""

    def __init__(self, c, p):
        super().__init__()
        self.kind = p["kind"]
        if self.kind == "convT":
            self.up = nn.ConvTranspose2d(c, p["out"], 2, stride=2)

    def forward(self, x):
        if self.kind == "convT":
            return F.max_pool2d(F.relu(self.up(x)), 2)
        y = F.interpolate(x, scale_factor=2, mode=self.kind)
        return F.avg_pool2d(y, 2)


class ChannelSlice(nn.Module):
    """Constant channel slices: cat([x, conv(x[:, a:b])]) or duplicated channels cat([x, x[:, :k]])."""

    def __init__(self, c, p):
        super().__init__()
        self.a, self.b, self.kind = p["a"], p["b"], p["kind"]
        if self.kind == "conv":
            self.conv = ConvBlock(self.b - self.a, dict(out=p["out"], k=1, bn=True, act="relu"))

    def forward(self, x):
        if self.kind == "conv":
            return torch.cat([x, self.conv(x[:, self.a:self.b])], 1)
        return torch.cat([x, x[:, self.a:self.b]], 1)


class EinsumAttention(nn.Module):
    """Single-head attention written with einsum, q/k/v from one linear."""

    def __init__(self, c, p):
        super().__init__()
        self.d = p["hd"]
        self.qkv = nn.Linear(c, 3 * self.d)
        self.o = nn.Linear(self.d, c)

    def forward(self, x):
        q, k, v = self.qkv(x).split(self.d, dim=-1)
        a = torch.einsum("bnd,bmd->bnm", q, k) * (self.d ** -0.5)
        return x + self.o(torch.einsum("bnm,bmd->bnd", a.softmax(-1), v))


class FunctionalLayer(nn.Module):
    """F.layer_norm and F.linear on loose parameters."""

    def __init__(self, c, p):
        super().__init__()
        self.c = c
        self.ln_w, self.ln_b = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
        self.weight, self.bias = nn.Parameter(torch.empty(p["out"], c)), nn.Parameter(torch.empty(p["out"]))

    def forward(self, x):
        x = F.layer_norm(x, (self.c,), self.ln_w, self.ln_b)
        return F.gelu(F.linear(x, self.weight, self.bias))


class Stem(nn.Module):
    def __init__(self, inp, p):
        super().__init__()
        self.kind = inp[0]
        if self.kind == "image":
            self.body = ConvBlock(inp[1], dict(out=p["out"], k=3, bn=True, act="relu"))
        elif self.kind == "ids":
            self.body = nn.Embedding(inp[1], p["out"])
        else:
            self.body = nn.Linear(inp[2], p["out"])

    def forward(self, x):
        return self.body(x)


BLOCKS = {
    "conv": ConvBlock, "res": Residual, "cat": Concat, "spcat": SpatialCat, "split": Split,
    "chunk": Chunk, "shuffle": Shuffle, "se": SqueezeExcite, "norm": Norm, "cl": ChannelsLast,
    "shared": Shared, "loose": Loose, "unruled": Unruled, "merge": Merge, "pool": Pool, "fit": Fit,
    "tap": Tap, "head": ConvHead, "tovec": ToVector, "totok": ToTokens, "vec": VecBlock,
    "mlp": Mlp, "mha": Mha, "txl": TxLayer, "hattn": HandAttention, "sdpa": Sdpa, "tlin": TokLinear,
    "cls": ClsToken, "pos": PosEmbed, "thead": TokHead, "cred": ChannelReduce, "up": Up,
    "cslice": ChannelSlice, "ein": EinsumAttention, "flayer": FunctionalLayer, "save": Save, "skip": Skip,
}


# ------------------------------------------------------------------------------------------
# widths through a program
def advance(s: dict, kind: str, p: dict) -> dict:
    """State after a block: stage ("conv", "vec", "tok", "end"), width C, spatial H, W, tokens N."""
    s = dict(s)
    C = s["C"]
    if kind == "conv":
        s["C"] = p["out"]
        if p.get("stride", 1) == 2:
            s["H"], s["W"] = (s["H"] + 1) // 2, (s["W"] + 1) // 2
    elif kind == "res":
        s["C"] = p["out"]
    elif kind == "cat":
        s["C"] = sum(p["widths"]) + (C if p["keep_x"] else 0)
    elif kind == "split":
        s["C"] = p["outs"][0] if p["combine"] == "add" else sum(p["outs"])
    elif kind == "chunk":
        sizes = chunk_sizes(C, p["n"])
        s["C"] = {"branch": sizes[0] + p.get("out", 0), "add": sizes[0], "each": p.get("out", 0)}[p["mode"]]
    elif kind == "cl":
        s["C"] = p["out"] or C
    elif kind == "merge":
        s["C"] = C if p["mode"] == "add" else C + p["out"]
    elif kind == "save":
        s["saved"] = s.get("saved", ()) + ((C, s["H"]),)
    elif kind == "skip" and p["mode"] == "cat":
        s["C"] = C + (p["out"] if p["proj"] else p["c_saved"])

    elif kind == "pool":
        s["H"], s["W"] = s["H"] // 2, s["W"] // 2
    elif kind == "fit":
        s["H"], s["W"] = s["H"] + s["H"] % 2, s["W"] + s["W"] % 2
    elif kind == "head":
        s["stage"] = "end"
    elif kind == "tovec":
        s["stage"], s["C"] = "vec", p["out"]
    elif kind == "totok":
        s["stage"] = "tok"
        if p["pool"]:
            s["H"], s["W"] = s["H"] // 2, s["W"] // 2
        s["N"] = s["H"] * s["W"]
    elif kind == "vec" and p["kind"] == "lin":
        s["C"] = p["out"]
    elif kind in ("tlin", "flayer"):
        s["C"] = p["out"]
    elif kind == "up" and p["kind"] == "convT":
        s["C"] = p["out"]
    elif kind == "cslice":
        s["C"] = C + (p["out"] if p["kind"] == "conv" else p["b"] - p["a"])
    elif kind == "cls":
        s["N"] += 1
        s["cls"] = True
    elif kind == "thead":
        s["stage"] = "end"
    return s


def build(spec: dict, seed: int = 0):
    """(model, example_inputs) for a program: eval mode, seeded random nonzero parameters."""
    torch.manual_seed(seed)
    model = Program.for_inputs(len(spec["inputs"]))(spec)
    init_weights(model, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = []
    for inp in spec["inputs"]:
        if inp[0] == "image":
            inputs.append(torch.randn(BATCH, inp[1], HW, HW, generator=g))
        elif inp[0] == "ids":
            inputs.append(torch.randint(0, inp[1], (BATCH, inp[2]), generator=g))
        else:
            inputs.append(torch.randn(BATCH, inp[1], inp[2], generator=g))
    return model, tuple(inputs)


class Program(nn.Module):
    """Interprets a program: a stem on input 0, then each block in order."""

    def __init__(self, spec: dict):
        super().__init__()
        self.kinds = [k for k, _ in spec["blocks"]]
        self.dict_out = spec.get("dict_out", False)
        inp = spec["inputs"][0]
        self.stem = Stem(inp, spec["stem"])
        s = start_state(spec)
        mods = []
        for kind, p in spec["blocks"]:
            mods.append(BLOCKS[kind](s["C"], p))
            if kind == "thead" and p["pool"] == "tied":
                mods[-1].tied.append(self.stem.body)
            s = advance(s, kind, p)
        self.blocks = nn.ModuleList(mods)
        self.slots = [p.get("slot") for _, p in spec["blocks"]]

    @staticmethod
    def for_inputs(n: int):
        return {1: Program1, 2: Program2, 3: Program3}[n]

    def run(self, inputs):
        x = self.stem(inputs[0])
        extra, saved = [], []
        for kind, blk, slot in zip(self.kinds, self.blocks, self.slots):
            if kind == "merge":
                x = blk(x, inputs)
            elif kind == "save":
                saved.append(blk(x))
            elif kind == "skip":
                x = blk(x, saved[slot])
            elif kind == "tap":
                extra.append(blk(x))
            else:
                x = blk(x)
        if self.dict_out:
            out = {"out": x}
            for i, t in enumerate(extra):
                out[f"aux{i}"] = t
            return out
        return (x, *extra) if extra else x


class Program1(Program):
    def forward(self, x):
        return self.run((x,))


class Program2(Program):
    def forward(self, x, x1):
        return self.run((x, x1))


class Program3(Program):
    def forward(self, x, x1, x2):
        return self.run((x, x1, x2))


def start_state(spec: dict) -> dict:
    inp = spec["inputs"][0]
    C = spec["stem"]["out"]
    if inp[0] == "image":
        return dict(stage="conv", C=C, H=HW, W=HW, N=0, cls=False)
    return dict(stage="tok", C=C, H=0, W=0, N=inp[2] if inp[0] == "ids" else inp[1], cls=False)


def init_weights(model: nn.Module, seed: int) -> None:
    """Every parameter and BN statistic random and nonzero; weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and leaf in ("weight", "in_proj_weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif leaf in ("weight", "gamma", "ln_w"):  # norm scales, PReLU, layer scale
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # biases, cls, pos
                p.copy_((torch.rand(p.shape, generator=g) - 0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.rand(b.shape, generator=g) - 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)

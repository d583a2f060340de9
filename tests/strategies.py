"""Random architectures for fuzzing `passes`: a generator of small *programs*, as a hypothesis strategy.

A program is a plain dict (printable, pasteable): the model inputs and a list of blocks
`[kind, params]`. One generic module, `Program` (tests/programs.py), builds a submodule per block and runs them in
a Python loop over the fixed list, which torch.fx traces through. Blocks cover the structures
the core supports:

- conv stage ([B, C, H, W]): conv (module, or F.conv2d on loose parameters), depthwise (with
  multiplier), grouped conv, residual (identity or 1x1 projection), concat on channels, concat
  on a spatial dim, split with unequal sizes (torch.split / Tensor.split / slices), chunk
  (shufflenet-style branch, sum of the chunks, per-chunk convs), channel shuffle
  (view/transpose/view with x.size(), with literals, nn.ChannelShuffle), squeeze-excitation
  (1x1 convs, or linears with a literal `view(-1, C, 1, 1)`), GroupNorm (one channel per
  group, or several), InstanceNorm, PReLU, channels-last LayerNorm (permute), a module called
  twice, layer scale and position parameters, reductions over channels (CBAM mean/amax,
  sum, softmax over C), upsampling (interpolate, ConvTranspose2d), constant channel slices,
  ops without a rule (cumsum/flip over channels: pinned), a second/third image input merged by
  add or cat, pooling, Python branches on shapes (odd sizes padded; a channel count read as an
  int: pinned), and extra outputs (a raw feature map, or a head);
- transitions: global-average / amax / 1x1-conv heads, flatten into a linear (torch.flatten,
  nn.Flatten or a literal `view(-1, N)`), tokens (flatten(2).transpose(1, 2));
- vector stage: linear, residual MLP, LayerNorm, BatchNorm1d, the channels as the length of a
  sequence through a pointwise Conv1d or ConvTranspose1d (prunable), a kernel-3 Conv1d or a
  max pool (pinned);
- token stage ([B, N, C], also from nn.Embedding on integer ids or from float tokens):
  MLP with layer scale, nn.MultiheadAttention (batch_first True/False), hand-written attention
  with literal head counts in reshape, F.scaled_dot_product_attention (view(B, N, h, -1) or
  literal head width), einsum attention, F.layer_norm + F.linear on loose parameters,
  width-changing linear, class token cat, position embedding add, extra outputs;
- outputs as a tensor, a tuple, or a dict.

The generator is written once against a tiny chooser interface (pick / integer / boolean /
sample): `programs()` and `prune_options(model)` wrap it as hypothesis strategies (what the
pytest fuzz test uses: shrinkable, derandomizable), `random_example(seed)` drives it from
`random.Random(seed)` (what benchmarks/fuzz.py uses: independent draws, each example
reproducible from one integer).

`build(spec, seed)` makes the model (eval mode, seeded, every parameter and BN statistic
random and nonzero) and its example inputs. `check(model, inputs, options, spec)` runs
passes.prune and asserts what every pruned model must satisfy, including that the saved plan
re-applies (through JSON) to a fresh instance of the same program.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn
from hypothesis import strategies as st

from programs import BLOCKS, CATMAX, WMAX, advance, build, chunk_sizes, start_state  # noqa: F401


# ------------------------------------------------------------------------------------------
# the generator, written once against a small chooser interface
class HypothesisChooser:
    """Choices drawn by hypothesis (shrinkable, derandomizable)."""

    def __init__(self, draw):
        self.draw = draw

    def pick(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def integer(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def boolean(self):
        return self.draw(st.booleans())

    def sample(self, seq, k):
        return self.draw(st.lists(st.sampled_from(list(seq)), min_size=k, max_size=k, unique=True))


class RandomChooser:
    """Independent uniform choices from `random.Random(seed)`: what benchmarks/fuzz.py uses, so
    every example is reproducible from its seed alone (hypothesis' generator mutates earlier
    examples, which gives many near-duplicates over long runs)."""

    def __init__(self, seed):
        import random
        self.rng = random.Random(seed)

    def pick(self, seq):
        return self.rng.choice(list(seq))

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)

    def boolean(self):
        return self.rng.random() < 0.5

    def sample(self, seq, k):
        return self.rng.sample(list(seq), k)


ACTS = ["relu", "gelu", "silu", "hardswish", "tanh", "none"]
CONV_KINDS = ["conv", "res", "cat", "split", "chunk", "shuffle", "se", "norm", "cl", "shared",
              "loose", "dw", "gconv", "spcat", "merge", "pool", "tap", "unruled", "cred", "up", "cslice",
              "save", "skip", "skip", "fit"]
VEC_KINDS = ["vec", "vec", "tap"]
TOK_KINDS = ["mlp", "mha", "txl", "hattn", "sdpa", "tlin", "cls", "pos", "tap", "ein", "flayer"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_block(ch, kind, s, spec):
    C, H, W = s["C"], s["H"], s["W"]
    w = lambda lo=1, hi=WMAX: ch.integer(lo, hi)  # noqa: E731
    if kind == "conv":
        p = dict(out=w(), k=ch.pick([1, 3]), bias=ch.boolean(), bn=ch.pick([False, True, True, "noaffine"]),
                 act=ch.pick(ACTS), fn=ch.boolean())
        if H >= 4 and ch.integer(0, 3) == 0:
            p["stride"] = 2
        if p["k"] == 3 and ch.integer(0, 3) == 0:
            p["dil"] = 2
        return "conv", p
    if kind == "dw":
        return "conv", dict(out=C * ch.pick([1, 1, 2]), k=3, groups=C, bias=ch.boolean(), bn=ch.boolean(),
                            act=ch.pick(ACTS))
    if kind == "gconv":
        g = ch.pick(divisors(C))
        return "conv", dict(out=g * ch.integer(1, max(1, WMAX // g)), k=ch.pick([1, 3]), groups=g,
                            bias=ch.boolean(), bn=ch.boolean(), act=ch.pick(ACTS))
    if kind == "res":
        proj = ch.boolean()
        return "res", dict(mid=w(), out=w() if proj else C, proj=proj, act=ch.pick(["relu", "gelu", "none"]))
    if kind == "cat":
        keep = ch.boolean()
        room = CATMAX - (C if keep else 0)
        n = ch.integer(1 if keep else 2, 3)
        return "cat", dict(widths=[w(1, max(1, min(WMAX, room // n))) for _ in range(n)], keep_x=keep)
    if kind == "spcat":
        return "spcat", dict(dim=ch.pick([2, 3]), restore=ch.pick(["pool", "slice"]))
    if kind == "split":
        if C < 2:
            return None
        n = ch.integer(2, min(4, C))
        cuts = sorted(ch.sample(range(1, C), n - 1))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [C])]
        combine = ch.pick(["add", "cat"])
        outs = [w(1, 12)] * len(sizes) if combine == "add" else [w(1, 12) for _ in sizes]
        return "split", dict(sizes=sizes, outs=outs, combine=combine, style=ch.pick(["fn", "method", "slice"]))
    if kind == "chunk":
        if C < 2:
            return None
        mode = ch.pick(["branch", "add", "each"])
        if mode == "branch":
            return "chunk", dict(n=2, mode=mode, out=w(1, 16))
        if mode == "add":
            return "chunk", dict(n=ch.pick([d for d in divisors(C) if d > 1]), mode=mode)
        return "chunk", dict(n=ch.integer(2, min(4, C)), mode=mode, out=w(1, 16))
    if kind == "shuffle":
        gs = [d for d in divisors(C) if 1 < d < C]
        if not gs:
            return None
        return "shuffle", dict(groups=ch.pick(gs), style=ch.pick(["size", "literal", "module"]), h=H, w=W)
    if kind == "se":
        return "se", dict(r=w(1, 8), style=ch.pick(["conv", "linear", "literal"]), gate=ch.pick(["sigmoid", "hardsigmoid"]))
    if kind == "norm":
        nk = ch.pick(["gn", "gn1", "in", "prelu", "prelu1"])
        if nk == "gn":  # one channel per group: per-channel statistics, exact
            return "norm", dict(kind="gn", groups=C, act=ch.pick(ACTS))
        if nk == "gn1":  # several channels per group: equivalence may not apply (reported)
            return "norm", dict(kind="gn", groups=ch.pick(divisors(C)), act="relu")
        return "norm", dict(kind=nk, act=ch.pick(ACTS))
    if kind == "cl":
        return "cl", dict(out=w() if ch.boolean() else 0)
    if kind == "shared":
        return "shared", dict(k=ch.pick([1, 3]), bn=ch.boolean())
    if kind == "loose":
        return "loose", dict(kind=ch.pick(["scale", "scale4", "pos"]), h=H, w=W)
    if kind == "unruled":
        return "unruled", dict(kind=ch.pick(["cumsum", "flip"]))
    if kind == "merge":
        if len(spec["inputs"]) >= 3:
            return None
        spec["inputs"].append(["image", ch.integer(1, 4)])
        mode = ch.pick(["add", "cat"])
        p = dict(input=len(spec["inputs"]) - 1, cin=spec["inputs"][-1][1], mode=mode, h=H)
        if mode == "cat":
            p["out"] = w(1, 12)
        return "merge", p
    if kind == "pool":
        return ("pool", dict(kind=ch.pick(["avg", "max"]))) if H >= 4 else None
    if kind == "fit":
        return "fit", dict(count=ch.boolean())
    if kind == "tap":
        return "tap", dict(stage="conv", out=ch.pick([0, 1, 2, 3, 4]))
    if kind == "save":
        return "save", {}
    if kind == "skip":
        saved = s.get("saved", ())
        if not saved:
            return None
        slot = ch.integer(0, len(saved) - 1)
        cs, hs = saved[slot]
        mode = ch.pick(["add", "cat"])
        proj = (cs != C or ch.boolean()) if mode == "add" else ch.boolean()
        p = dict(slot=slot, mode=mode, proj=proj, c_saved=cs, h=H, h_saved=hs)
        if mode == "cat" and proj:
            p["out"] = w(1, 12)
        return "skip", p
    if kind == "cred":
        return "cred", dict(kind=ch.pick(["spatial", "sum", "softmax"]))
    if kind == "up":
        k = ch.pick(["nearest", "bilinear", "convT"])
        return "up", (dict(kind=k, out=w()) if k == "convT" else dict(kind=k))
    if kind == "cslice":
        a = ch.integer(0, C - 1)
        b = ch.integer(a + 1, C)
        k = ch.pick(["conv", "dup"])
        return "cslice", (dict(a=a, b=b, kind=k, out=w(1, 12)) if k == "conv" else dict(a=a, b=b, kind=k))
    raise AssertionError(kind)


def _tok_block(ch, kind, s):
    C, N = s["C"], s["N"]
    if kind == "mlp":
        return "mlp", dict(hidden=ch.integer(1, WMAX), scale=ch.boolean())
    if kind == "mha":
        return "mha", dict(heads=ch.pick(divisors(C)), batch_first=ch.boolean())
    if kind == "txl":
        return "txl", dict(heads=ch.pick(divisors(C)), ff=ch.integer(1, WMAX), act=ch.pick(["relu", "gelu"]),
                           batch_first=ch.boolean(), norm_first=ch.boolean(),
                           wrap=ch.pick(["layer", "encoder", "decoder"]), n=ch.integer(1, 2))
    if kind == "hattn":
        return "hattn", dict(heads=ch.integer(1, 4), hd=ch.integer(1, 8))
    if kind == "sdpa":
        return "sdpa", dict(heads=ch.integer(1, 4), hd=ch.integer(1, 8), vd=ch.integer(1, 8), literal=ch.boolean())
    if kind == "tlin":
        return "tlin", dict(out=ch.integer(1, WMAX), act=ch.pick(ACTS))
    if kind == "cls":
        return None if s["cls"] else ("cls", {})
    if kind == "pos":
        return "pos", dict(n=N)
    if kind == "tap":
        return "tap", dict(stage="tok", out=ch.pick([0, 1, 2, 3, 4]))
    if kind == "ein":
        return "ein", dict(hd=ch.integer(1, 8))
    if kind == "flayer":
        return "flayer", dict(out=ch.integer(1, WMAX))
    raise AssertionError(kind)


def _vec_block(ch, kind, s):
    if kind == "tap":
        return "tap", dict(stage="vec", out=ch.pick([0, 1, 2, 3, 4]))
    vk = ch.pick(["lin", "res", "ln", "bn", "len"])
    p = dict(kind=vk)
    if vk in ("lin", "res"):
        p["out"] = ch.integer(1, WMAX)
    if vk == "len":
        p["op"], p["m"] = ch.pick(["point", "pointT", "window", "pool"]), ch.integer(1, 3)
    if vk == "lin":
        p["act"] = ch.pick(ACTS)
    return "vec", p


def gen_program(ch, max_blocks: int = 6) -> dict:
    """A random valid program (see the module docstring): the spec dict `build` takes."""
    start = ch.pick(["image", "image", "image", "ids", "tokens"])
    if start == "image":
        inputs = [["image", ch.integer(1, 4)]]
    elif start == "ids":
        inputs = [["ids", ch.integer(2, 20), ch.integer(2, 8)]]
    else:
        inputs = [["tokens", ch.integer(2, 8), ch.integer(1, 8)]]
    spec = {"inputs": inputs, "stem": {"out": ch.integer(1, WMAX)}, "blocks": []}
    s = start_state(spec)
    n = ch.integer(1, max_blocks)
    for i in range(n):
        last = i == n - 1
        if s["stage"] == "conv":
            kind = ch.pick(CONV_KINDS + ([] if last else ["tovec", "totok"]))
            if s.get("saved") and ch.integer(0, 2) == 0:  # a saved tensor wants a long connection
                kind = "skip"
            if kind == "tovec":
                blk = ("tovec", dict(s=ch.pick([1, 2, 4]), out=ch.integer(1, WMAX),
                                     style=ch.pick(["fn", "module", "literal"]), act=ch.pick(ACTS)))
            elif kind == "totok":
                blk = ("totok", dict(pool=s["H"] >= 4 and ch.boolean()))
            else:
                blk = _conv_block(ch, kind, s, spec)
        elif s["stage"] == "vec":
            blk = _vec_block(ch, ch.pick(VEC_KINDS), s)
        else:
            blk = _tok_block(ch, ch.pick(TOK_KINDS), s)
        if blk is None:
            continue
        spec["blocks"].append([blk[0], blk[1]])
        s = advance(s, blk[0], blk[1])
    out = ch.integer(1, 6)
    if s["stage"] == "conv":
        head = ("head", dict(kind=ch.pick(["gap", "conv", "amax"]), out=out))
    elif s["stage"] == "vec":
        head = ("vec", dict(kind="lin", out=out, act="none"))
    else:
        tie = spec["inputs"][0][0] == "ids" and s["C"] == spec["stem"]["out"]
        head = ("thead", dict(pool=ch.pick(["mean", "first"] + (["tied", "tied"] if tie else [])), out=out))
    spec["blocks"].append([head[0], head[1]])
    if ch.integer(0, 7) == 0:
        spec["dict_out"] = True
    return spec


RATIOS = [i / 20 for i in range(18)]  # 0.0 .. 0.85
JITTER = [0.0, 0.013, 0.021, 0.037, 0.049]


def gen_options(ch, model: nn.Module) -> dict:
    """passes.prune options: ratio in [0, 0.9), global or not, round_to, ignored layers, importance, max_ratio."""
    names = sorted(n for n, _ in model.named_modules() if n)
    ignored = []
    if names and ch.integer(0, 3) == 0:
        ignored = ch.sample(names, min(len(names), ch.integer(1, 3)))
    opts = dict(ratio=round(ch.pick(RATIOS) + ch.pick(JITTER), 3), global_pruning=ch.boolean(),
                round_to=ch.pick([None, None, 2, 4, 8]), ignored_layers=ignored,
                importance=ch.pick(["l1", "l2", "random"]))
    if ch.integer(0, 2) == 0:
        opts["max_ratio"] = round(ch.pick(RATIOS[2:]) + 0.1, 3)
    if names and ch.integer(0, 3) == 0:  # per-module ratios (by name)
        opts["ratios"] = {n: round(ch.pick(RATIOS), 3) for n in ch.sample(names, min(len(names), ch.integer(1, 2)))}
    return opts


@st.composite
def programs(draw, max_blocks: int = 6):
    return gen_program(HypothesisChooser(draw), max_blocks)


@st.composite
def prune_options(draw, model: nn.Module):
    return gen_options(HypothesisChooser(draw), model)


def random_example(seed: int, max_blocks: int = 6):
    """(spec, options) from one integer: what benchmarks/fuzz.py draws."""
    ch = RandomChooser(seed)
    spec = gen_program(ch, max_blocks)
    model, _ = build(spec)
    return spec, gen_options(ch, model)


def outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, tuple) else [out]


def check(model: nn.Module, inputs: tuple, opts: dict, spec: dict | None = None):
    """passes.prune must run, keep output shapes and verify with masked equivalence (every
    normalisation included: the oracle takes statistics over kept positions). With `spec`, the
    saved plan must also re-apply to a fresh instance (other weights) of it. Returns the prune
    result and the re-applied one (None without `spec`)."""
    import passes

    before = [tuple(t.shape) for t in outputs(model, inputs)]
    r = passes.prune(model, inputs, **opts)
    after = [tuple(t.shape) for t in outputs(r.model, inputs)]
    assert after == before, f"output shapes changed: {before} -> {after}"
    v = r.report.verify
    assert v is not None and v.ok, v.message if v else "no verify report"
    assert v.exact, f"masked equivalence did not apply: {v.inexact}"
    assert v.max_rel_error is not None and v.max_rel_error <= 1e-4, v.message
    if spec is not None:
        fresh, _ = build(spec, seed=1)
        with tempfile.TemporaryDirectory() as d:  # through JSON, as a user would
            plan = passes.Plan.load(r.plan.save(os.path.join(d, "plan.json")))
        again = passes.apply_plan(fresh, plan, inputs)
        shapes = lambda m: {n: tuple(t.shape) for n, t in m.state_dict().items()}  # noqa: E731
        assert shapes(again.model) == shapes(r.model), "the plan re-applied to a fresh instance gives other widths"
        assert again.report.verify.ok, again.report.verify.message
        return r, again
    return r, None


def spec_size(spec: dict) -> int:
    return len(spec["blocks"]) + len(spec["inputs"])

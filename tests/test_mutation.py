"""Nothing mutated: the public API leaves the caller's model bit-identical unless inplace=True.

For each model (every structure in tests/models.py, torchvision resnet18 and mobilenet_v3_small
at 32x32, a small torchvision VisionTransformer at 32x32), with training flags mixed (train()
and then every other module in eval mode, so restoring "all eval" or "all train" is wrong),
passes.prune, analyze, verify, apply_plan and count must leave unchanged:

- every parameter and buffer: the same tensor object, torch.equal values, dtype, requires_grad,
  no gradient appearing;
- every module: its class, its plain attributes (ints, floats, bools, strings, tuples:
  in/out_channels, groups, num_heads, normalized_shape, eps, ...), its training flag, its
  parameter/buffer/child names and its hooks;
- torch's global switches the pipeline flips for a while (grad mode, MHA fast path).

With inplace=True prune does change the caller: its tensors are sliced to the pruned widths.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import passes
from passes.verify import flatten_outputs

from models import STRUCTURES


pytestmark = pytest.mark.usefixtures("one_thread")

SIMPLE = (int, float, bool, str, tuple, type(None), torch.Size)


def _tv(name, **kw):
    import torchvision

    torch.manual_seed(0)
    if name == "vit_tiny":
        m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    else:
        m = torchvision.models.get_model(name, weights=None, **kw)
    with torch.no_grad():  # torchvision zero-initialises some heads and class tokens
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return m, torch.randn(2, 3, 32, 32)


MODELS = {name: (lambda name=name: _structure(name)) for name in STRUCTURES}
MODELS.update({
    "tv_resnet18": lambda: _tv("resnet18"),
    "tv_mobilenet_v3_small": lambda: _tv("mobilenet_v3_small"),
    "tv_vit_tiny": lambda: _tv("vit_tiny"),
})


def _structure(name):
    torch.manual_seed(0)
    factory, inputs = STRUCTURES[name]
    return factory(), inputs()


def build(name):
    model, x = MODELS[name]()
    model.train()
    for i, m in enumerate(model.modules()):  # mixed flags: every other module in eval mode
        if i % 2:
            m.training = False
    return model, x


def snapshot(model: nn.Module) -> dict:
    tensors = {}
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for n, t in items:
            tensors[(kind, n)] = (t, t.detach().clone(), t.dtype, t.requires_grad, t.grad is None)
    modules = {}
    for n, m in model.named_modules(remove_duplicate=False):
        attrs = {k: copy.deepcopy(v) for k, v in vars(m).items()
                 if isinstance(v, SIMPLE) and not (isinstance(v, tuple) and not all(isinstance(e, SIMPLE) for e in v))}
        modules[n] = dict(cls=type(m), attrs=attrs, params=tuple(m._parameters), buffers=tuple(m._buffers),
                          children=tuple(m._modules),
                          hooks=tuple(len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                                   "_backward_hooks", "_state_dict_hooks")))
    switches = dict(grad=torch.is_grad_enabled(), mha_fastpath=torch.backends.mha.get_fastpath_enabled())
    return dict(tensors=tensors, modules=modules, switches=switches)


def differences(before: dict, model: nn.Module) -> list[str]:
    after = snapshot(model)
    out = []
    if set(before["tensors"]) != set(after["tensors"]):
        out.append(f"tensor names changed: {set(before['tensors']) ^ set(after['tensors'])}")
    for key, (obj, val, dtype, rg, no_grad) in before["tensors"].items():
        if key not in after["tensors"]:
            continue
        obj2, _, dtype2, rg2, no_grad2 = after["tensors"][key]
        if obj2 is not obj:
            out.append(f"{key[0]} '{key[1]}' replaced by another tensor")
        if obj2.shape != val.shape or dtype2 != dtype or not torch.equal(obj2.detach(), val):
            out.append(f"{key[0]} '{key[1]}' changed (shape {tuple(val.shape)} -> {tuple(obj2.shape)})")
        if rg2 != rg or no_grad2 != no_grad:
            out.append(f"{key[0]} '{key[1]}' requires_grad/grad changed")
    if set(before["modules"]) != set(after["modules"]):
        out.append(f"module names changed: {set(before['modules']) ^ set(after['modules'])}")
    for n, b in before["modules"].items():
        a = after["modules"].get(n)
        if a is None:
            continue
        for k in ("cls", "params", "buffers", "children", "hooks"):
            if a[k] != b[k]:
                out.append(f"module '{n}' {k}: {b[k]} -> {a[k]}")
        for k in set(a["attrs"]) | set(b["attrs"]):
            va, vb = a["attrs"].get(k, "<missing>"), b["attrs"].get(k, "<missing>")
            if va != vb and not (va != va and vb != vb):  # NaN-tolerant
                out.append(f"module '{n}' attribute {k}: {vb!r} -> {va!r}")
    if after["switches"] != before["switches"]:
        out.append(f"torch switches changed: {before['switches']} -> {after['switches']}")
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_api_leaves_the_callers_model_untouched(name):
    model, x = build(name)
    problems = {}

    def check(call, fn):
        before = snapshot(model)
        out = fn()
        diff = differences(before, model)
        if diff:
            problems[call] = diff[:8]
        return out

    r = check("prune", lambda: passes.prune(model, x, ratio=0.5))
    assert r.report.units_removed > 0 and r.report.verify.ok
    check("prune(global, round_to=4, ignored)", lambda: passes.prune(
        model, x, ratio=0.3, global_pruning=True, round_to=4,
        ignored_layers=[next(n for n, m in model.named_modules() if n and list(m.parameters(recurse=False)))]))
    cg = check("analyze", lambda: passes.analyze(model, x))
    assert len(cg.units) > 0
    v = check("verify", lambda: passes.verify(model, r, x))
    assert v.ok
    again = check("apply_plan", lambda: passes.apply_plan(model, r.plan, x))
    assert again.plan.removed == r.plan.removed
    params, macs = check("count", lambda: passes.count(model, x))
    assert params == r.report.params_before and macs > 0
    assert not problems, "\n".join(f"{call}: {d}" for call, ds in problems.items() for d in ds)


@pytest.mark.parametrize("name", ["residual", "mnist", "grouped", "embedding", "tv_resnet18"])
def test_inplace_prune_changes_the_callers_model(name):
    """inplace=True slices the caller's own tensors: its parameters take the pruned shapes (and
    leave the other calls' guarantees above untouched for the rest of the process)."""
    model, x = build(name)
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    r = passes.prune(model, x, ratio=0.5, inplace=True)
    after = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pruned = {n: tuple(p.shape) for n, p in r.model.named_parameters()}
    assert any(after[n] != before[n] for n in before), "inplace=True left every caller tensor as it was"
    assert {n: s for n, s in after.items() if n in pruned} == {n: s for n, s in pruned.items() if n in after}
    assert sum(map(lambda s: torch.Size(s).numel(), after.values())) == r.report.params_after
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert r.report.verify.ok


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_inplace_caller_is_a_working_pruned_model(name):
    """After prune(..., inplace=True) the caller's model must be usable and compute what
    result.model computes -- or prune must refuse inplace before touching it (a PassesError).
    Core bug: the caller's tensors and leaf-module attributes are sliced, but its Python forward
    keeps the original literals (view(-1, 320), y[:, :8], split sizes, reshape head counts) and
    nn.MultiheadAttention is replaced only in result.model, so the caller crashes; with SDPA the
    caller silently computes something else (default scale of the new head width)."""
    model, x = _structure(name)
    model.eval()
    xs = x if isinstance(x, tuple) else (x,)
    pristine = copy.deepcopy(model)
    try:
        r = passes.prune(model, x, ratio=0.5, inplace=True)
    except passes.PassesError:
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pristine.state_dict().values()))
        return
    with torch.no_grad():
        got = flatten_outputs(model(*xs))
        want = flatten_outputs(r.model(*xs))
    assert [t.shape for t in got] == [t.shape for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_snapshot_sees_every_kind_of_mutation():
    """The checks above are not vacuous: each kind of change is reported."""
    model, _ = build("residual")
    before = snapshot(model)
    assert differences(before, model) == []
    with torch.no_grad():
        model.stem[1].running_mean[0] += 1  # a buffer value
    model.a[0][0].out_channels = 99  # a module attribute
    model.b.training = not model.b.training  # a training flag
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # same values, new object
    model.head.register_forward_hook(lambda *a: None)  # a leftover hook
    diff = "\n".join(differences(before, model))
    for needle in ("buffer 'stem.1.running_mean' changed", "'a.0.0' attribute out_channels: 32 -> 99",
                   "'b' attribute training", "param 'head.weight' replaced", "module 'head' hooks"):
        assert needle in diff, diff

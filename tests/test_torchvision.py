"""Real models nobody here wrote: torchvision classification models, and Torch-Pruning side by side."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import passes

# name -> (constructor kwargs, input size). Small inputs wherever the model allows them.
MODELS = {
    "resnet18": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "densenet121": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 64),
    "regnet_x_400mf": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64),
    "swin_t": ({}, 64),
}


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    with torch.no_grad():  # torchvision zero-initialises some heads: the output would be constant
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_model(name):
    kw, size = MODELS[name]
    model = build(name, **kw)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    assert ref.std() > 0  # a constant output would make equivalence vacuous
    r = passes.prune(model, x, ratio=0.5)
    with torch.no_grad():
        out = r.model(x)
    assert out.shape == ref.shape
    rep = r.report
    assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before
    v = rep.verify
    assert v.ok and v.exact, v.message  # LayerNorm models too: the oracle computes it over kept channels
    assert v.max_rel_error <= 1e-4


def _tp_widths(model, x):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
        global_pruning=False, ignored_layers=[model.fc])
    pruner.step()
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_layer_widths_agree_with_torch_pruning(name):
    pytest.importorskip("torch_pruning")
    model = build(name)
    x = torch.randn(1, 3, 64, 64)
    theirs = _tp_widths(model, x)
    ours = {n: tuple(m.weight.shape) for n, m in passes.prune(model, x, ratio=0.5, importance="l2").model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}
    assert set(ours) == set(theirs)
    assert {n: s for n, s in ours.items() if theirs[n] != s} == {}
    assert ours["layer1.0.conv1"][0] == theirs["layer1.0.conv1"][0] == 32

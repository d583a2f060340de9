"""timm models (weights=None) with structures the torchvision zoo lacks, pruned and verified:
CoaT's Conv1d aggregate over the channels of three feature vectors (channels in a conv's
length dim), and Python branches on shapes (MobileViT pads to its patch size, TinyViT and
EfficientViT-M test window sizes, CrossViT resizes to its branch sizes). Needs timm (the test
extra installs it)."""

from __future__ import annotations

import pytest
import torch

import passes

timm = pytest.importorskip("timm")

# name -> input size (the smallest the model allows, or the one it is built for)
CASES = {
    "coat_tiny": 224,  # patch embeddings built for 224
    "mobilevit_xxs": 64,
    "tiny_vit_5m_224": 224,  # window sizes fixed by the constructor
    "efficientvit_m0": 224,
    "crossvit_tiny_240": 240,
}


@pytest.mark.parametrize("name", list(CASES))
def test_timm_model_prunes_and_verifies(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, CASES[name], CASES[name])
    r = passes.prune(model, x, ratio=0.3)
    with torch.no_grad():
        assert r.model(x).shape == model(x).shape
    rep = r.report
    assert rep.verify.ok, rep.verify.message
    assert rep.macs_after < 0.8 * rep.macs_before and rep.params_after < rep.params_before
    if name == "coat_tiny":  # the aggregate's input channels are carried through it, not pinned
        assert r.model.head.in_features < model.head.in_features
    else:  # a branch on shapes: the graph holds its run-time check
        assert any(n.target is torch._assert for n in r.model.graph.nodes)

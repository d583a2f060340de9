"""Real models nobody here wrote: torchvision classification models, and Torch-Pruning side by side."""

from __future__ import annotations

import copy

import pytest
import torch

import passes
from passes.models import torchvision_model

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
    return torchvision_model(name, **kw)


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


def _metas(gm, x, fast):
    from passes.trace import propagate_shapes

    macs = propagate_shapes(gm, (x,), fast=fast)
    return macs, {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "googlenet", "convnext_tiny", "vit_b_16", "swin_t"])
def test_closed_form_shapes_equal_torch_meta_kernels(name):
    """passes.shapes' formulas (convs, linears, norms, activations, arithmetic, attention,
    pooling, flatten) give every node the tensor_meta (shape, dtype, strides) and MACs torch's
    own kernels give, on the original and on the pruned model (SlimMultiheadAttention,
    window_attention)."""
    from passes.count import count_macs
    from passes.trace import trace

    kw, size = MODELS[name]
    model = build(name, **kw)
    x = torch.randn(1, 3, size, size)
    pruned = passes.prune(model, x, ratio=0.5, verify=False).model
    for m in (model, pruned):
        gm = trace(copy.deepcopy(m), x).gm
        slow, fast = _metas(gm, x, False), _metas(gm, x, True)
        assert fast[1] == slow[1]
        assert fast[0] == slow[0] == count_macs(m, x) > 0


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_pruned_model_prunes_again(name):
    """Iterative pruning: the pruned model (SlimMultiheadAttention, window_attention) traces,
    keeps its attention head widths prunable, and passes masked equivalence again."""
    kw, size = MODELS[name]
    model = build(name, **kw)
    x = torch.randn(1, 3, size, size)
    first = passes.prune(model, x, ratio=0.3)
    second = passes.prune(first.model, x, ratio=0.3)
    rep = second.report
    assert rep.verify.ok and rep.verify.exact, rep.verify.message
    assert rep.macs_after < 0.6 * rep.macs_before  # head widths shrink again, not only the MLPs
    assert not [p for p in rep.pinned if "passes." in p.reason]  # our own replacements have rules


def test_video_swin_attention_heads_are_pruned():
    """swin3d_t: torchvision's shifted_window_attention_3d has a rule (head widths pruned, the
    rewrite calls passes.ops.window_attention_3d); shifted windows and padding are exercised at
    8x64x64 (16x16 tokens after the patch embedding, window 8x7x7)."""
    torch.manual_seed(0)
    model = build("swin3d_t")
    x = torch.randn(1, 3, 8, 64, 64)
    r = passes.prune(model, x, ratio=0.5)
    rep = r.report
    assert rep.verify.ok and rep.verify.exact, rep.verify.message
    assert rep.macs_after < 0.35 * rep.macs_before  # 0.73 when the attention was opaque
    attn = r.model.get_submodule("features.0.0.attn")
    assert attn.qkv.weight.shape[0] < 3 * 96 and attn.proj.weight.shape[1] < 96


def _small_mvit(v2: bool) -> torch.nn.Module:
    """torchvision's MViT with three small blocks: v2 (relative position tables, pooled
    residual) or v1 (absolute position embeddings, class token in the residual); q and kv
    pooling with strides, a head count change and a width change between blocks."""
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    def block(heads, c_in, c_out, stride_q, stride_kv):
        return MSBlockConfig(num_heads=heads, input_channels=c_in, output_channels=c_out, kernel_q=[3, 3, 3],
                             kernel_kv=[3, 3, 3], stride_q=stride_q, stride_kv=stride_kv)

    torch.manual_seed(0)
    blocks = [block(1, 16, 16, [1, 1, 1], [1, 2, 2]), block(2, 16, 32, [1, 2, 2], [1, 1, 1]),
              block(2, 32, 32, [1, 1, 1], [1, 1, 1])]
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=v2,
                residual_with_cls_embed=not v2, rel_pos_embed=v2, proj_after_attn=v2, num_classes=10).eval()


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_mvit_head_widths_and_residual_stream_are_pruned(v2):
    """MViT's fx-wrapped helpers (_unsqueeze/_squeeze, _add_shortcut, _add_rel_pos) and the
    ops its pooling and position embeddings use (tensor_split, repeat_interleave) have rules:
    nothing is pinned for want of one, head widths (with the pooling convs and v2's relative
    position tables) and the residual stream shrink, and masked equivalence holds."""
    model = _small_mvit(v2)
    x = torch.randn(1, 3, 4, 32, 32)
    r = passes.prune(model, x, ratio=0.5)
    rep = r.report
    assert rep.verify.ok and rep.verify.exact, rep.verify.message
    assert not [p.reason for p in rep.pinned if "no rule" in p.reason]
    assert rep.macs_after < 0.5 * rep.macs_before  # 0.65 (v2) and 0.81 (v1) with the helpers opaque
    attn = r.model.get_submodule("blocks.2.attn")
    head_dim = attn.pool_q.pool.weight.shape[0]
    assert head_dim < 16 and attn.qkv.weight.shape[0] == 3 * 2 * head_dim
    if v2:
        assert attn.rel_pos_h.shape[1] == attn.rel_pos_t.shape[1] == head_dim
    assert r.model.get_submodule("norm").weight.shape[0] < 32


def test_detection_model_prunes_through_its_backbone():
    """fx cannot trace a torchvision detector (its forward loops over a list of images); the
    error names the part to prune instead, and `part="backbone"` prunes the backbone on the
    batch it receives (resized, normalised, padded by the detector's transform) in a copy of
    the detector; the FPN outputs are the part's outputs, so they keep their 256 channels and
    the heads run unchanged."""
    from passes import TraceError

    model = build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=None, min_size=96, max_size=96)
    images = [torch.rand(3, 80, 112)]
    with pytest.raises(TraceError, match=r"part='backbone'"):
        passes.prune(model, torch.randn(1, 3, 96, 96))
    r = passes.prune(model, images, ratio=0.5, part="backbone")
    rep = r.report
    assert rep.verify.ok and rep.verify.exact, rep.verify.message
    assert rep.params_after < 0.5 * rep.params_before
    assert r.model is not model and r.model.backbone.out_channels == 256
    batch = r.graph.traced.example_inputs[0]
    assert batch.shape[2:] != (80, 112) and batch.shape[2] % 32 == 0  # what the backbone received
    with torch.no_grad():
        features = r.model.backbone(batch)
        detections = r.model(images)
    assert {k: v.shape[1] for k, v in features.items()} == {"0": 256, "1": 256, "pool": 256}
    assert set(detections[0]) == {"boxes", "labels", "scores"} and detections[0]["boxes"].shape[1] == 4

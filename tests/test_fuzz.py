"""Fuzzed architectures: random programs (tests/strategies.py) pruned with random options.

Every drawn model must prune, keep its output shapes and pass verification: masked equivalence
within 1e-4 (relative), normalisations included; in a quarter of the examples the saved plan
must also re-apply (through JSON) to a fresh instance. 200 deterministic examples
(derandomized) run here, about 30 s of CPU; the long runs are `benchmarks/fuzz.py` (every
example with the plan round trip).
The regression tests below are the smallest programs found that broke the core, one per bug.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import passes

import strategies as S

# Shrinking a failure costs minutes with these models; PASSES_FUZZ_SHRINK=1 turns it on (the
# regression tests below hold shrunk programs already).
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("PASSES_FUZZ_SHRINK") else [])
FUZZ = settings(derandomize=True, max_examples=200, deadline=None, database=None, phases=_PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: torch's intra-op threads only add synchronisation on this shared 2-core
    machine (measured 5x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@FUZZ
@given(spec=S.programs(), data=st.data())
def test_random_architecture_prunes_with_masked_equivalence(spec, data):
    model, inputs = S.build(spec)
    opts = data.draw(S.prune_options(model), label="options")
    roundtrip = data.draw(st.integers(0, 3), label="plan round trip if 0") == 0  # a quarter: time budget
    S.check(model, inputs, opts, spec if roundtrip else None)


# -- the generator itself ---------------------------------------------------------------------
def test_generator_covers_every_block_kind_and_builds_runnable_models():
    seen = set()
    for seed in range(300):
        spec, opts = S.random_example(seed)
        seen.update(k for k, _ in spec["blocks"])
        if seed < 60:  # building and running is cheap; pruning is what the fuzz test does
            model, inputs = S.build(spec)
            outs = S.outputs(model, inputs)
            assert outs and all(torch.isfinite(t).all() for t in outs), spec
            assert not any(m.training for m in model.modules())
            assert 0 <= opts["ratio"] < 0.9
    assert seen == set(S.BLOCKS), f"never drawn: {set(S.BLOCKS) - seen}"


def test_random_example_is_reproducible_from_its_seed():
    assert S.random_example(123) == S.random_example(123)
    a, b = S.build(S.random_example(7)[0]), S.build(S.random_example(7)[0])
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_check_rejects_a_wrong_model():
    """The fuzz oracle is not vacuous: a pruned model with two kept channels swapped fails verify."""
    spec = {"inputs": [["image", 3]], "stem": {"out": 8},
            "blocks": [["conv", {"out": 12, "k": 3, "bias": True, "bn": True, "act": "relu"}],
                       ["head", {"kind": "gap", "out": 4}]]}
    model, inputs = S.build(spec)
    r, _ = S.check(model, inputs, dict(ratio=0.5))
    conv = r.model.get_submodule("blocks.0.conv")
    with torch.no_grad():
        conv.weight[[0, 1]] = conv.weight[[1, 0]]
    v = passes.verify(model, r, inputs)
    assert not v.ok and v.max_rel_error > 1e-3


# -- regressions: smallest programs found by the fuzzer, one per core bug ---------------------
def _stem(out, cin=3):
    return {"inputs": [["image", cin]], "stem": {"out": out}}


REGRESSIONS = {
    # F.conv2d on a loose weight: its kernel dims (3x3) became pruning units (bug 01)
    "functional_conv_kernel": ({**_stem(8), "blocks": [
        ["conv", {"out": 6, "k": 3, "bias": False, "bn": True, "act": "relu", "fn": True}],
        ["head", {"kind": "gap", "out": 3}]]}, dict(ratio=0.5)),
    # nn.ChannelShuffle(4) on 8 channels: groups pruned, module's groups not rewritten (bug 02)
    "channel_shuffle_module": ({**_stem(8), "blocks": [
        ["shuffle", {"groups": 4, "style": "module", "h": 8, "w": 8}],
        ["head", {"kind": "conv", "out": 3}]]}, dict(ratio=0.5)),
    # x.view(b, g, c // g, h, w) with g > c // g: literal g rewritten, c // g not (bug 03)
    "channel_shuffle_view_computed_size": ({**_stem(8), "blocks": [
        ["shuffle", {"groups": 4, "style": "size", "h": 8, "w": 8}],
        ["head", {"kind": "conv", "out": 3}]]}, dict(ratio=0.5)),
    # grouped conv (2 channels per group), then x.view(b, 16, c // 16, h, w): whole groups are
    # units, so the labels go to the literal 16, and c // 16 changes with c (bug 05)
    "grouped_conv_then_view_shuffle": ({**_stem(16), "blocks": [
        ["conv", {"out": 32, "k": 3, "groups": 16, "bias": True, "bn": False, "act": "relu"}],
        ["shuffle", {"groups": 16, "style": "size", "h": 8, "w": 8}],
        ["head", {"kind": "amax", "out": 1}]]}, dict(ratio=0.087, global_pruning=True, importance="random")),
    # torch.chunk into 1-channel pieces that are added: a piece can empty out (bug 04)
    "chunk_into_single_channels_added": ({**_stem(6), "blocks": [
        ["chunk", {"n": 6, "mode": "add"}],
        ["head", {"kind": "conv", "out": 3}]]}, dict(ratio=0.5)),
    # split into width-1 q/k/v feeding einsum: einsum ignores size-1 dims (bug 04, einsum rule)
    "einsum_width_one_heads": ({"inputs": [["tokens", 5, 4]], "stem": {"out": 8}, "blocks": [
        ["ein", {"hd": 1}],
        ["thead", {"pool": "mean", "out": 3}]]}, dict(ratio=0.5)),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_regression(name):
    spec, opts = REGRESSIONS[name]
    model, inputs = S.build(spec)
    S.check(model, inputs, opts, spec)

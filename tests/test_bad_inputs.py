"""Bad inputs: every mistake a caller can make ends in a specific `passes.PassesError`.

Each test asserts the error type (InputError, TraceError, PlanError ... all PassesError) and that
the message is short, names the place (argument, parameter, node/module, file:line) and the bad
value, and, where torch raised underneath, carries torch's own reason instead of a wrapper.
Where the right behaviour is not an error (integer inputs, a model in training mode, a module
with no rule), the test pins down what happens instead.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import passes
from passes import InputError, PassesError, PlanError, TraceError

from models import Embed, MnistNet, Residual, Shared, UnknownOp, cbr, image


pytestmark = pytest.mark.usefixtures("one_thread")


def _residual():
    torch.manual_seed(0)
    return Residual().eval(), image()


def assert_clean(exc_info, cls, *needles):
    """A PassesError of type `cls`, one line-ish, no torch internals, mentioning every needle."""
    e = exc_info.value
    msg = str(e)
    assert isinstance(e, PassesError) and isinstance(e, cls), f"{type(e).__name__}: {msg}"
    assert len(msg.splitlines()) <= 2 and len(msg) <= 700, f"message too long ({len(msg)} chars): {msg}"
    for junk in ("meta=", "nn_module_stack", "Traceback", "num_users"):
        assert junk not in msg, f"torch internals ({junk!r}) in message: {msg}"
    for n in needles:
        if isinstance(n, re.Pattern):
            assert n.search(msg), f"{n.pattern!r} not in: {msg}"
        else:
            assert n in msg, f"{n!r} not in: {msg}"
    return msg


# -- arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize("option,bad", [("ratio", b) for b in (-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5",
                                                                None, True)]
                         + [("max_ratio", b) for b in (1.0, -0.5, float("nan"))])
def test_ratio_outside_unit_interval(option, bad):
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, **{option: bad})
    assert_clean(ei, InputError, option, repr(bad))


def test_per_module_ratio_names_the_module_and_value():
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, ratios={"stem.0": 1.5})
    assert_clean(ei, InputError, "'stem.0'", "1.5")
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, ratios={"stem.9": 0.5})
    assert_clean(ei, InputError, "'stem.9'")


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "8"])
def test_round_to_must_be_a_positive_int(bad):
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, round_to=bad)
    assert_clean(ei, InputError, "round_to", repr(bad))


def test_unknown_importance():
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, importance="taylorish")
    assert_clean(ei, InputError, "importance", "'taylorish'", "l2")


def test_ignored_layer_that_does_not_exist():
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, ignored_layers=["stem.0", "nope"])
    assert_clean(ei, InputError, "ignored_layers", "'nope'")
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, ignored_layers=[nn.Conv2d(16, 16, 1)])  # a module, but not this model's
    assert_clean(ei, InputError, "ignored_layers", "Conv2d(16, 16")


def test_ignored_layers_given_as_one_string():
    """`ignored_layers="stem"` is a common slip. Right: treat it as ["stem"] or say it must be a
    list, naming 'stem'. Core bug: the string is iterated character by character ("names module
    's', which the model does not have")."""
    model, x = _residual()
    try:
        r = passes.prune(model, x, ratio=0.5, ignored_layers="stem")
    except PassesError as e:
        assert "'stem'" in str(e), f"message does not name the argument given: {e}"
    else:
        assert r.model.get_submodule("stem.0").out_channels == 16


# -- example inputs ---------------------------------------------------------------------------
def _torch_reason(model, x) -> str:
    try:
        model(x)
    except Exception as e:  # what torch itself says
        return str(e).splitlines()[0]
    raise AssertionError("the model runs on these inputs")


@pytest.mark.parametrize("case", ["channels", "rank"])
def test_example_inputs_of_the_wrong_shape(case):
    """InputError naming the failing node/module, the example input's shape and dtype, and torch's
    own reason -- in a line or two, without torch.fx's node dumps. Core bug (first seen): the
    message was ShapeProp's wrapper ("ShapeProp error for: node=%stem_0 : [num_users=1] = ...
    with meta={'nn_module_stack': ...}") and torch's reason was lost."""
    model, _ = _residual()
    x = {"channels": torch.randn(2, 5, 16, 16), "rank": torch.randn(2, 3, 16)}[case]
    reason = _torch_reason(model, x)
    with pytest.raises(InputError) as ei:
        passes.prune(model, x)
    assert_clean(ei, InputError, re.compile(r"stem[._]0"), f"{tuple(x.shape)}", "float32", reason)


@pytest.mark.parametrize("case", ["float64", "float16", "int64"])
def test_example_inputs_of_the_wrong_dtype(case):
    """float64/float16 input to a float32 model, integer input to a conv: InputError naming the
    input (index or the node it fails at) and its dtype, with the model's dtype or torch's reason."""
    model, _ = _residual()
    x = {"float64": torch.randn(2, 3, 16, 16, dtype=torch.float64),
         "float16": torch.randn(2, 3, 16, 16).half(),
         "int64": torch.randint(0, 5, (2, 3, 16, 16))}[case]
    reason = _torch_reason(model, x)
    with pytest.raises(InputError) as ei:
        passes.prune(model, x)
    msg = assert_clean(ei, InputError, case, re.compile(r"input 0|stem[._]0"))
    assert "float32" in msg or reason in msg, msg


def test_wrong_number_of_inputs():
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, (x, x))
    assert_clean(ei, InputError, "Residual", "1", "2")


@pytest.mark.parametrize("bad", [[1, 2], (), "x", None])
def test_example_inputs_not_tensors(bad):
    model, _ = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, bad)
    assert_clean(ei, InputError, "example_inputs", type(bad).__name__)


def test_example_inputs_numpy():
    model, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(model, x.numpy())
    assert_clean(ei, InputError, "example_inputs", "ndarray")


def test_model_not_a_module():
    _, x = _residual()
    with pytest.raises(InputError) as ei:
        passes.prune(lambda t: t, x)
    assert_clean(ei, InputError, "nn.Module", "function")


def test_nan_example_input_is_an_input_error():
    """Right: InputError naming the input and its NaN/Inf values. Core bug: the NaN flows through
    and verify reports "masked equivalence FAILS: max abs error nan" (a VerificationError that
    blames the pruner)."""
    model, x = _residual()
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError) as ei:
        passes.prune(model, x)
    assert_clean(ei, InputError, re.compile(r"(?i)nan"), re.compile(r"input"))


# -- integer inputs ---------------------------------------------------------------------------
def test_integer_inputs_embedding_model_prunes():
    torch.manual_seed(0)
    model, ids = Embed().eval(), torch.randint(0, 50, (2, 7))
    r = passes.prune(model, ids, ratio=0.5)
    assert r.model.emb.num_embeddings == 50  # rows are looked up by index: never pruned
    assert r.model.emb.embedding_dim == 12 and r.model.fc.in_features == 12
    assert r.model(ids).shape == model(ids).shape == (2, 3)
    assert r.report.verify.ok and r.report.verify.exact and r.report.verify.max_rel_error <= 1e-4


def test_float_ids_for_an_embedding_model():
    torch.manual_seed(0)
    model = Embed().eval()
    x = torch.rand(2, 7)
    reason = _torch_reason(model, x)
    with pytest.raises(InputError) as ei:
        passes.prune(model, x)
    assert_clean(ei, InputError, re.compile(r"\bemb\b"), "(2, 7)", "float32", reason)


# -- control flow -----------------------------------------------------------------------------
class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 4, 1)


class _If(_Base):
    def forward(self, x):
        y = self.c(x)
        if y.mean() > 0:  # LINE-IF
            y = y * 2
        return self.d(y)


class _Loop(_Base):
    def forward(self, x):
        y = self.c(x)
        for _ in range(int(y.sum())):  # LINE-LOOP
            y = y + 1
        return self.d(y)


class _Assert(_Base):
    def forward(self, x):
        y = self.c(x)
        assert y.abs().sum() >= 0  # LINE-ASSERT
        return self.d(y)


def _line_of(tag: str) -> int:
    src = open(__file__).read().splitlines()
    return next(i for i, line in enumerate(src, 1) if line.rstrip().endswith(f"# {tag}") and "def " not in line)


@pytest.mark.parametrize("cls,tag", [(_If, "LINE-IF"), (_Loop, "LINE-LOOP"), (_Assert, "LINE-ASSERT")])
def test_data_dependent_control_flow_names_file_and_line(cls, tag):
    with pytest.raises(TraceError) as ei:
        passes.prune(cls().eval(), image(s=8))
    msg = assert_clean(ei, TraceError, f"test_bad_inputs.py:{_line_of(tag)}", cls.__name__)
    assert "submodule" in msg and "opaque" in msg  # says what to do


def test_analyze_raises_the_same_trace_error():
    with pytest.raises(TraceError) as ei:
        passes.analyze(_If().eval(), image(s=8))
    assert_clean(ei, TraceError, f"test_bad_inputs.py:{_line_of('LINE-IF')}")


# -- training mode ----------------------------------------------------------------------------
def _flags(model):
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("setup", ["train", "mixed", "eval_root_train_children"])
def test_model_in_training_mode(setup):
    """prune traces and verifies in eval mode, leaves the caller's flags alone, and the pruned
    model carries the caller's flag on every module it shares a name with. Core bug: torch.fx
    rebuilds container modules (nn.Sequential 'a', 'a.0', ...) as fresh nn.Modules with
    training=True, so a caller's container in eval mode comes back in training mode."""
    torch.manual_seed(0)
    model, x = Residual(), image()
    if setup == "train":
        model.train()
    elif setup == "mixed":
        model.train()
        model.a.eval()
        model.stem[1].eval()
    else:
        model.eval()
        model.training = True
        model.b.train()
    flags = _flags(model)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    r = passes.prune(model, x, ratio=0.5)
    assert _flags(model) == flags  # caller untouched
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # BN stats not updated
    assert r.report.verify.ok and r.report.verify.exact
    got = _flags(r.model)
    wrong = {n: (flags[n], got[n]) for n in flags if n in got and got[n] != flags[n]}
    assert not wrong, f"training flags (caller, pruned) differ: {wrong}"


class _TrainOnlyScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.training:  # noise, stochastic depth, ...: a Python branch on the flag
            y = y * 2.0
        return self.b(y)


class _AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        out = self.b(y).mean((2, 3))
        if self.training:  # Inception-style auxiliary output
            return out, self.aux(y).mean((2, 3))
        return out


@pytest.mark.parametrize("cls", [_TrainOnlyScale, _AuxHead])
def test_training_mode_branches_are_traced_in_eval_mode(cls):
    """A model in training mode with `if self.training:` in its forward: prune must trace the eval
    path, so the pruned model (in eval mode) equals the original (in eval mode). Core bug:
    symbolic_trace runs with the caller's flags and bakes the training branch into the graph;
    the oracle's masked copy is traced the same way and agrees ("max abs error 0") -- a silently
    wrong model; with an auxiliary training-only output, VerificationError "output shapes differ"."""
    torch.manual_seed(0)
    model, x = cls().train(), image(s=8)
    for ratio in (0.0, 0.5):
        r = passes.prune(model, x, ratio=ratio)
        assert r.report.verify.ok and r.report.verify.exact
        assert model.training  # caller untouched
        if ratio == 0.0:
            reference = copy.deepcopy(model).eval()
            pruned = r.model.eval()
            with torch.no_grad():
                torch.testing.assert_close(pruned(x), reference(x))


# -- dtypes and weights -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_models_are_refused(dtype):
    model, x = _residual()
    model = model.to(dtype)
    for inp in (x.to(dtype), x):
        with pytest.raises(InputError) as ei:
            passes.prune(model, inp)
        assert_clean(ei, InputError, "'stem.0.weight'", str(dtype), "float32", "model.float()")
    with pytest.raises(InputError):
        passes.analyze(model, x.to(dtype))


@pytest.mark.parametrize("where,value", [("a.0.0.weight", float("nan")), ("head.bias", float("inf")),
                                         ("stem.1.running_var", float("-inf"))])
def test_nan_inf_weights_name_the_parameter(where, value):
    model, x = _residual()
    t = dict(list(model.named_parameters()) + list(model.named_buffers()))[where]
    with torch.no_grad():
        t.view(-1)[1] = value
    with pytest.raises(InputError) as ei:
        passes.prune(model, x)
    assert_clean(ei, InputError, f"'{where}'", "1 NaN/Inf")
    plan = passes.prune(_residual()[0], x).plan
    with pytest.raises(InputError) as ei:
        passes.apply_plan(model, plan, x)
    assert_clean(ei, InputError, f"'{where}'", "1 NaN/Inf")


class _Masked(nn.Module):
    """A buffer of -Inf (an attention mask, an unbounded clamp): a value like any other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.register_buffer("floor", torch.full((1, 8, 1, 1), float("-inf")))

    def forward(self, x):
        return self.b(torch.maximum(self.a(x), self.floor))


def test_infinite_buffers_are_values_but_nan_is_refused():
    torch.manual_seed(0)
    model, x = _Masked().eval(), image(s=8)
    r = passes.prune(model, x, ratio=0.5)
    assert r.report.verify.ok and r.report.params_after < r.report.params_before
    assert passes.apply_plan(_Masked().eval(), r.plan, x).report.verify.ok
    with torch.no_grad():
        model.floor[0, 3] = float("nan")
    for call in (lambda: passes.prune(model, x), lambda: passes.apply_plan(model, r.plan, x)):
        with pytest.raises(InputError) as ei:
            call()
        assert_clean(ei, InputError, "buffer 'floor'", "1 NaN values")


# -- plans ------------------------------------------------------------------------------------
def test_plan_applied_to_a_different_model(tmp_path):
    model, x = _residual()
    plan = passes.prune(model, x, ratio=0.5).plan
    with pytest.raises(PlanError) as ei:
        passes.apply_plan(MnistNet().eval(), plan, torch.randn(2, 1, 28, 28))
    assert_clean(ei, PlanError, plan.fingerprint, "another architecture")
    torch.manual_seed(0)
    with pytest.raises(PlanError) as ei:
        passes.apply_plan(Shared().eval(), passes.Plan.load(plan.save(tmp_path / "p.json")), x)
    assert_clean(ei, PlanError, "fingerprint")


def test_plan_applied_to_same_layers_with_other_widths():
    model, x = _residual()
    plan = passes.prune(model, x, ratio=0.5).plan
    other = Residual().eval()
    other.head = nn.Linear(16, 7)  # same graph, one layer wider
    with pytest.raises(PlanError) as ei:
        passes.apply_plan(other, plan, x)
    assert_clean(ei, PlanError, "fingerprint")


def test_plan_with_tampered_indices():
    model, x = _residual()
    plan = passes.prune(model, x, ratio=0.5).plan
    name = next(iter(plan.removed))
    plan.removed[name][0] = plan.removed[name][0] + [999]
    with pytest.raises(PlanError) as ei:
        passes.apply_plan(model, plan, x)
    assert_clean(ei, PlanError, "999", f"'{name}'")


def test_plan_file_that_is_not_a_plan(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError) as ei:
        passes.Plan.load(bad)
    assert_clean(ei, PlanError, "bad.json")
    bad.write_text('{"format": "other/1"}')
    with pytest.raises(PlanError) as ei:
        passes.Plan.load(bad)
    assert_clean(ei, PlanError, "'other/1'")


def test_apply_plan_with_something_that_is_not_a_plan():
    """Right: a PassesError saying a passes.Plan is needed. Core bug: AttributeError
    "'dict' object has no attribute 'to_units'" escapes from apply_plan."""
    model, x = _residual()
    plan = passes.prune(model, x, ratio=0.5).plan
    with pytest.raises(PassesError) as ei:
        passes.apply_plan(model, plan.to_dict(), x)
    assert_clean(ei, PassesError, "Plan", "dict")


# -- ops without a rule: documented pin -------------------------------------------------------
def test_function_without_rule_pins_its_channels():
    torch.manual_seed(0)
    model, x = UnknownOp().eval(), image()
    r = passes.prune(model, x, ratio=0.5)
    assert r.model.get_submodule("a.0").out_channels == 16  # feeds cumsum over channels
    assert r.model.get_submodule("b.0").out_channels == 8
    pins = [p for p in r.report.pinned if "no rule" in p.reason]
    assert pins and all("cumsum" in p.reason for p in pins) and pins[0].channels == 16
    assert r.report.verify.ok and r.report.verify.exact


class _AroundModule(nn.Module):
    def __init__(self, mod, mid):
        super().__init__()
        self.a = cbr(3, 16)
        self.mod = mod
        self.b = cbr(mid, 16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.out(self.b(self.mod(self.a(x))))


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.lstm(self.fc2(F.relu(self.fc(x))))
        return self.out(y[:, -1])


@pytest.mark.parametrize("name", ["lstm", "pixel_shuffle", "local_response_norm"])
def test_module_without_rule_pins_its_channels(name):
    torch.manual_seed(0)
    if name == "lstm":
        model, x, feeding, free = _LSTMNet().eval(), torch.randn(2, 5, 6), "fc2", "fc"
    elif name == "pixel_shuffle":
        model, x, feeding, free = _AroundModule(nn.PixelShuffle(2), 4).eval(), image(s=8), "a.0", "b.0"
    else:
        model, x, feeding, free = _AroundModule(nn.LocalResponseNorm(3), 16).eval(), image(s=8), "a.0", "b.0"
    before = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    r = passes.prune(model, x, ratio=0.5)
    assert r.model.get_submodule(feeding).weight.shape[0] == before[feeding][0]  # output into the op stays
    assert r.model.get_submodule(free).weight.shape[0] < before[free][0]  # the rest still prunes
    pins = [p for p in r.report.pinned if "no rule" in p.reason]
    assert pins and all("'mod'" in p.reason or "'lstm'" in p.reason for p in pins), r.report.pinned
    assert r.report.verify.ok and r.report.verify.exact
    if name == "lstm":
        lstm = r.model.lstm
        assert (lstm.input_size, lstm.hidden_size) == (16, 12)
        assert lstm.weight_ih_l0.shape == (48, 16)


# -- models the pipeline cannot copy or trace faithfully --------------------------------------
class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_model_that_cannot_be_deep_copied():
    """Right: an InputError naming what cannot be copied. Core bug: copy.deepcopy's raw TypeError
    ("cannot pickle '_thread.lock' object") escapes from prune and analyze."""
    import threading

    model = _Plain().eval()
    model.lock = threading.Lock()
    for fn in (passes.prune, passes.analyze):
        with pytest.raises(PassesError) as ei:
            fn(model, image(s=8))
        assert_clean(ei, PassesError, "lock")


@pytest.mark.parametrize("kind", ["pre_hook", "hook"])
def test_hooks_on_the_root_module_are_not_silently_dropped(kind):
    """fx traces root.forward, not root.__call__, so hooks on the model itself are not in the
    graph. Right: refuse with a PassesError naming the hook, or keep it (the pruned model equals
    the caller's at ratio 0). Core bug: silently dropped, and verify (whose masked copy is traced
    the same way) reports "max abs error 0"."""
    torch.manual_seed(0)
    model, x = _Plain().eval(), image(s=8)
    if kind == "pre_hook":
        model.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2.0,))
    else:
        model.register_forward_hook(lambda mod, inp, out: out * 3.0)
    try:
        r = passes.prune(model, x, ratio=0.0)
    except PassesError as e:
        assert "hook" in str(e), e
        return
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), model(x))


class _WithParts(nn.Module):
    """A backbone called with a tensor, a head called with a tensor and a keyword, and a spare
    module the forward never calls."""

    def __init__(self):
        super().__init__()
        self.backbone = cbr(3, 8)
        self.head = _Scaled()
        self.spare = nn.Linear(2, 2)

    def forward(self, images: list):
        return self.head(self.backbone(torch.stack(images)), scale=2.0)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x, scale=1.0):
        return self.conv(x) * scale


@pytest.mark.parametrize("part, inputs, needles", [
    ("backbon", None, ["'backbon'", "no submodule", "did you mean 'backbone'"]),
    ("", None, ["part must be", "''"]),
    (3, None, ["part must be", "3"]),
    ("spare", None, ["'spare'", "Linear", "not called"]),
    ("head", None, ["'head'", "scale=", "positional"]),
    ("backbone", "tensor", ["_WithParts does not run on example_inputs", "[image]"]),
])
def test_part_that_cannot_be_pruned_is_named(part, inputs, needles):
    torch.manual_seed(0)
    model = _WithParts().eval()
    x = image(s=8) if inputs == "tensor" else [torch.rand(3, 8, 8)]
    with pytest.raises(InputError) as ei:
        passes.prune(model, x, part=part)
    assert_clean(ei, InputError, *needles)

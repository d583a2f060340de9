"""Verify: forward/shape check plus masked equivalence, the oracle for every pruned model.

The *masked original* is the original model with every parameter slice the plan removes set
to zero (producer rows, biases, norm affine and running statistics, consumer columns). The
pruned model must give its outputs up to float rounding. Parameter masking alone is exact
wherever removed channels only flow into layers whose columns were zeroed. Where the analysis
recorded a reduction over a channel dim, the masked original is evaluated (an fx Interpreter)
over the kept positions only, which is what the physically smaller model computes:

- "sum" (matmul/einsum contraction, sum): removed positions are zeroed first;
- "mean": the masked sum is divided by the kept count instead of the full count;
- "softmax", "max": removed positions are set to -inf (+inf for a min) first;
- "norm" (LayerNorm, GroupNorm, batch statistics of BatchNorm and F.batch_norm as in timm's
  weight standardisation, instance statistics; modules and functions): mean and variance over
  the kept positions of the dims the statistics span (for GroupNorm, of each group), then the
  affine parameters.

A normalisation the oracle does not know would make equivalence inapplicable: the model would
get the forward and shape check, and the report would say which node. Every norm rule of
`passes.rules` records a reduction the oracle reproduces.

The comparison runs in float32. When it fails, it is repeated in float64 (masked original and a
float64 copy of the pruned model): a wrong model stays wrong, while float32 rounding that an
ill-conditioned op amplified disappears. The report then says `precision="float64"` and quotes
both errors.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .channels import attr_at
from .errors import InputError, VerificationError, first_line
from .plan import removed_mask
from .rules import layers as Ly, rule_for
from .trace import FreshArgs, as_inputs, default_args, eval_mode, part_inputs, symbolic_trace


@dataclass
class VerifyReport:
    ok: bool
    shapes_match: bool
    exact: bool  # masked equivalence applies (and was checked) for this plan
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    inexact: list[str] = field(default_factory=list)  # why equivalence does not apply
    message: str = ""
    precision: str = "float32"  # "float64": float32 differed, the float64 recheck decided

    def to_dict(self) -> dict:
        return dict(vars(self))


def flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def masked_copy(original: torch.nn.Module, plan, inputs: tuple) -> fx.GraphModule:
    """A traced deep copy of `original` with the plan's removed slices zeroed (names as in the graph)."""
    model = copy.deepcopy(original)
    with eval_mode(model):  # traced as the pruned model was: eval-mode branches, shape branches
        gm = symbolic_trace(model, default_args(model, len(inputs)), inputs=inputs)
    with torch.no_grad():
        for name, d, idx in plan.indices():
            attr_at(gm, name).index_fill_(int(d), torch.as_tensor(idx, dtype=torch.long), 0.0)
    return gm


class _KeptOnly(FreshArgs, fx.Interpreter):
    """Runs the masked original; reductions over channel dims see only kept positions."""

    def __init__(self, gm, masks):
        super().__init__(gm)
        self.masks = masks  # node name -> [(arg index, dim, kind, keep bool tensor)]

    def run_node(self, n):
        if n.name not in self.masks:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        specs = self.masks[n.name]
        kind = specs[0][2]
        if kind in _NORM_KINDS:
            return self._norm(kind, n, args, kwargs, specs)
        scale = 1.0
        for i, d, k, keep in specs:
            x = args[i]
            shape = [1] * x.dim()
            shape[d] = -1
            keep_b = keep.view(shape)
            if k in ("sum", "mean"):
                args[i] = x * keep_b
                if k == "mean":
                    scale *= keep.numel() / max(int(keep.sum()), 1)
            else:  # softmax, max: removed positions never win
                fill = float("inf") if "amin" in str(n.target) else float("-inf")
                args[i] = x.masked_fill(~keep_b, fill)
        out = getattr(self, n.op)(n.target, tuple(args), kwargs)
        return out * scale if scale != 1.0 else out

    def _norm(self, kind, n, args, kwargs, specs):
        """A normalisation whose statistics span pruned positions: the statistics of the masked
        original are taken over the kept positions only (what the smaller tensor's are), per
        kind (`_NORM_RULES`): dims the statistics span, then the affine parameters."""
        call = _norm_call(kind, n, args, kwargs, self.fetch_attr if n.op == "call_module" else None)
        x = call["input"]
        keep = torch.ones([1] * x.dim(), dtype=torch.bool)
        for _, d, _, kp in specs:
            shape = [1] * x.dim()
            shape[d] = -1
            keep = keep & kp.view(shape)
        if kind == "layer":
            k = len(call["normalized_shape"])
            y = _kept_stats(x, keep, tuple(range(x.dim() - k, x.dim())), call["eps"])
            w_shape = None
        elif kind == "group":
            g = call["num_groups"]
            grouped = [x.shape[0], g, x.shape[1] // g, *x.shape[2:]]
            keep = keep.expand(1, *x.shape[1:]).reshape(1, *grouped[1:])
            y = _kept_stats(x.reshape(grouped), keep, tuple(range(2, len(grouped))), call["eps"]).reshape(x.shape)
            w_shape = [1, -1] + [1] * (x.dim() - 2)
        else:  # batch statistics: every dim but 1; instance statistics: the spatial dims
            dims = tuple(d for d in range(x.dim()) if d != 1) if kind == "batch" else tuple(range(2, x.dim()))
            y = _kept_stats(x, keep, dims, call["eps"])
            w_shape = [1, -1] + [1] * (x.dim() - 2)
        w, b = call.get("weight"), call.get("bias")
        if w is not None:
            y = y * (w if w_shape is None else w.view(w_shape))
        if b is not None:
            y = y + (b if w_shape is None else b.view(w_shape))
        return y


def _kept_stats(x: torch.Tensor, keep: torch.Tensor, dims: tuple, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), mean and biased variance over `dims` counting only the
    positions `keep` (a bool tensor that broadcasts to x) marks."""
    cnt = keep.expand(x.shape).sum(dims, keepdim=True).to(x.dtype)
    mean = (x * keep).sum(dims, keepdim=True) / cnt
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / cnt
    return (x - mean) / torch.sqrt(var + eps)


# the norm rules (the only ones that record "norm" reductions) -> how the oracle normalises
_NORM_RULES = {Ly.BATCH_NORM: "batch", Ly.BATCH_NORM_FN: "batch", Ly.INSTANCE_NORM: "instance",
               Ly.LAYER_NORM: "layer", Ly.LAYER_NORM_FN: "layer", Ly.GROUP_NORM: "group", Ly.GROUP_NORM_FN: "group"}
_NORM_KINDS = frozenset(_NORM_RULES.values())
# the parameters of the functional forms (F.batch_norm, F.layer_norm, F.group_norm)
_NORM_ARGS = {"batch": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
              "layer": ("input", "normalized_shape", "weight", "bias", "eps"),
              "group": ("input", "num_groups", "weight", "bias", "eps")}


def _norm_call(kind: str, n: fx.Node, args, kwargs, fetch) -> dict:
    """The norm's input, statistics extent, eps and affine parameters, from the module (`fetch`
    given) or from the function's arguments."""
    if fetch is not None:
        m = fetch(n.target)
        call = dict(input=args[0], eps=m.eps, weight=m.weight, bias=m.bias)
        if kind == "layer":
            call["normalized_shape"] = m.normalized_shape
        elif kind == "group":
            call["num_groups"] = m.num_groups
        return call
    return {"eps": 1e-5, **dict(zip(_NORM_ARGS[kind], args)), **kwargs}


def _masks(cg, removed) -> tuple[dict, list[str]]:
    masks, inexact = {}, []
    for red in cg.reductions:
        kinds = []
        for d, arr in zip(red.dims, red.labels):
            rm = removed[arr]
            if rm.any():
                kinds.append((red.arg, d, red.kind, torch.from_numpy(~rm)))
        if not kinds:
            continue
        if red.kind == "norm":
            n = _node(cg, red.node)
            norm = _NORM_RULES.get(rule_for(n, cg.traced)) if n is not None else None
            if norm is None:
                inexact.append(f"'{red.node}' normalises over pruned channels in a way the oracle does not "
                               f"reproduce (statistics change)")
                continue
            kinds = [(i, d, norm, keep) for i, d, _, keep in kinds]
        masks.setdefault(red.node, []).extend(kinds)
    return masks, inexact


def _node(cg, name: str) -> fx.Node | None:
    return next((n for n in cg.traced.gm.graph.nodes if n.name == name), None)


def verify(original: torch.nn.Module, result, example_inputs, *, atol: float = 1e-5,
           rtol: float = 1e-4) -> VerifyReport:
    """Check `result.model` against `original` and `result.plan` (see module docstring). For a
    result of `prune(..., part=)`, `example_inputs` are the whole model's: the part is checked
    against the original's part, on the inputs that receives."""
    if getattr(result, "part", None):
        original, example_inputs = part_inputs(original, result.part, example_inputs)
        result = dataclasses.replace(result, model=result.model.get_submodule(result.part), part=None)
    inputs = as_inputs(example_inputs)
    with torch.no_grad(), eval_mode(original), eval_mode(result.model):
        try:
            ref = flatten_outputs(original(*inputs))
        except Exception as e:  # shapes are propagated on meta tensors, which check no values
            raise InputError(f"the model does not run on example inputs: {type(e).__name__}: "
                             f"{first_line(e)}") from e
        got = flatten_outputs(result.model(*inputs))
    shapes = [tuple(t.shape) for t in ref] == [tuple(t.shape) for t in got]
    if not shapes:
        return VerifyReport(False, False, False, message=(
            f"output shapes differ: original {[tuple(t.shape) for t in ref]}, pruned {[tuple(t.shape) for t in got]}"))
    cg = result.graph
    removed = removed_mask(cg, result.removed_units)
    masks, inexact = _masks(cg, removed)
    if inexact:
        return VerifyReport(True, True, False, inexact=inexact,
                            message="forward and shapes ok; masked equivalence does not apply: " + "; ".join(inexact))
    masked = masked_copy(original, result.plan, inputs)
    want = _run_masked(masked, masks, inputs)
    abs_err, rel = _errors(got, want)
    ok = abs_err <= atol or rel <= rtol
    tol = f"(tolerance rtol={rtol:g}, atol={atol:g})"
    msg = (f"masked equivalence {'holds' if ok else 'FAILS'}: max abs error {abs_err:.3g}, "
           f"max relative error {rel:.3g} {tol}")
    if not ok:
        again = _in_float64(masked, result.model, masks, inputs)
        if isinstance(again, str):
            msg += f"; float64 recheck not possible ({again})"
        elif again[0] <= atol or again[1] <= rtol:
            msg = (f"masked equivalence holds in float64: max abs error {again[0]:.3g}, max relative "
                   f"error {again[1]:.3g} {tol}; in float32 they differ by rounding only (max relative "
                   f"error {rel:.3g}: an ill-conditioned op, such as a normalisation of a nearly "
                   f"constant signal, amplifies rounding)")
            return VerifyReport(True, True, True, again[0], again[1], message=msg, precision="float64")
        else:
            msg += f"; in float64 too: max abs error {again[0]:.3g}, max relative error {again[1]:.3g}"
    return VerifyReport(ok, True, True, abs_err, rel, message=msg)


def _run_masked(masked: fx.GraphModule, masks: dict, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad(), eval_mode(masked):
        return flatten_outputs(_KeptOnly(masked, masks).run(*inputs) if masks else masked(*inputs))


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """Max absolute difference, and that over the largest reference magnitude."""
    abs_err = max((float((a - b).abs().max()) if a.numel() else 0.0) for a, b in zip(got, want))
    scale = max((float(b.abs().max()) if b.numel() else 0.0) for b in want)
    return abs_err, abs_err / max(scale, 1e-12)


def _in_float64(masked: fx.GraphModule, pruned: torch.nn.Module, masks: dict, inputs: tuple):
    """(abs, rel) errors of the same comparison in float64, or why it cannot run. A float32
    mismatch is either a wrong model (it stays in float64) or rounding that an ill-conditioned
    op amplified (it vanishes: measured 6e-4 in float32, 7e-13 in float64, on a softmax over
    channels followed by InstanceNorm). Only run when float32 fails: it copies the pruned model."""
    try:
        pruned64 = copy.deepcopy(pruned).double()
        inputs64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        want = _run_masked(masked.double(), masks, inputs64)
        with torch.no_grad(), eval_mode(pruned64):
            got = flatten_outputs(pruned64(*inputs64))
        return _errors(got, want)
    except Exception as e:  # an op without float64 support, a dtype baked into the graph, ...
        return f"{type(e).__name__}: {first_line(e)}"


def check(original, result, example_inputs, **tol) -> VerifyReport:
    report = verify(original, result, example_inputs, **tol)
    if not report.ok:
        raise VerificationError(report.message, report)
    return report

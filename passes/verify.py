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
- "norm" of LayerNorm, and of F.batch_norm with batch statistics (timm's weight
  standardisation): mean and variance over kept positions only.

GroupNorm statistics over a pruned dim have no such form here; such a model gets the forward
and shape check, and the report says which node made equivalence inapplicable.

The comparison runs in float32. When it fails, it is repeated in float64 (masked original and a
float64 copy of the pruned model): a wrong model stays wrong, while float32 rounding that an
ill-conditioned op amplified disappears. The report then says `precision="float64"` and quotes
both errors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .channels import attr_at
from .errors import InputError, VerificationError
from .plan import removed_mask
from .trace import FreshArgs, as_inputs, default_args, eval_mode, symbolic_trace


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


def masked_copy(original: torch.nn.Module, plan, n_inputs: int) -> fx.GraphModule:
    """A traced deep copy of `original` with the plan's removed slices zeroed (names as in the graph)."""
    model = copy.deepcopy(original)
    with eval_mode(model):  # traced as the pruned model was: eval-mode branches
        gm = symbolic_trace(model, default_args(model, n_inputs))
    with torch.no_grad():
        for name, dims in plan.removed.items():
            t = attr_at(gm, name)
            for d, idx in dims.items():
                t.index_fill_(int(d), torch.tensor(idx, dtype=torch.long), 0.0)
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
        if kind == "norm":
            if _is_batch_norm(n):
                return self._batch_norm(args, kwargs, specs)
            return self._layer_norm(n, args, kwargs, specs)
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

    def _batch_norm(self, args, kwargs, specs):
        """F.batch_norm with batch statistics: per channel (dim 1), mean and biased variance over
        the kept positions of the other dims (what the smaller tensor's statistics are)."""
        call = _batch_norm_call(args, kwargs)
        x = call["input"]
        keep = torch.ones([1 if d == 1 else s for d, s in enumerate(x.shape)], dtype=torch.bool)
        for _, d, _, kp in specs:
            shape = [1] * x.dim()
            shape[d] = -1
            keep = keep & kp.view(shape)
        dims = tuple(d for d in range(x.dim()) if d != 1)
        cnt = keep.sum()
        mean = (x * keep).sum(dims, keepdim=True) / cnt
        var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / cnt
        y = (x - mean) / torch.sqrt(var + call.get("eps", 1e-5))
        shape = [1] * x.dim()
        shape[1] = -1
        if call.get("weight") is not None:
            y = y * call["weight"].view(shape)
        if call.get("bias") is not None:
            y = y + call["bias"].view(shape)
        return y

    def _layer_norm(self, n, args, kwargs, specs):
        x = args[0]
        if n.op == "call_module":
            m = self.fetch_attr(n.target)
            w, b, eps, k = m.weight, m.bias, m.eps, len(m.normalized_shape)
        else:
            k = len(args[1] if len(args) > 1 else kwargs["normalized_shape"])
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            b = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        keep = torch.ones(x.shape[-k:], dtype=torch.bool)
        for _, d, _, kp in specs:
            shape = [1] * k
            shape[d - (x.dim() - k)] = -1
            keep = keep & kp.view(shape)
        dims = tuple(range(-k, 0))
        cnt = keep.sum()
        xm = x * keep
        mean = xm.sum(dims, keepdim=True) / cnt
        var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / cnt
        y = (x - mean) / torch.sqrt(var + eps)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y


def _is_batch_norm(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is F.batch_norm


def _batch_norm_call(args: list, kwargs: dict) -> dict:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    call = dict(zip(names, args))
    call.update(kwargs)
    return call


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
        if red.kind == "norm" and not _is_layer_norm(cg, red.node) and not _exact_batch_norm(cg, red.node):
            inexact.append(f"'{red.node}' normalises over pruned channels (group statistics change)")
            continue
        masks.setdefault(red.node, []).extend(kinds)
    return masks, inexact


def _exact_batch_norm(cg, name) -> bool:
    """F.batch_norm (its reductions are recorded only for batch statistics): the oracle
    normalises over kept positions."""
    n = _node(cg, name)
    return n is not None and _is_batch_norm(n)


def _is_layer_norm(cg, name) -> bool:
    n = _node(cg, name)
    if n is not None and n.op == "call_module":
        return isinstance(cg.traced.gm.get_submodule(n.target), torch.nn.LayerNorm)
    return n is not None and n.target is F.layer_norm


def _node(cg, name: str) -> fx.Node | None:
    return next((n for n in cg.traced.gm.graph.nodes if n.name == name), None)


def verify(original: torch.nn.Module, result, example_inputs, *, atol: float = 1e-5,
           rtol: float = 1e-4) -> VerifyReport:
    """Check `result.model` against `original` and `result.plan` (see module docstring)."""
    inputs = as_inputs(example_inputs)
    with torch.no_grad(), eval_mode(original), eval_mode(result.model):
        try:
            ref = flatten_outputs(original(*inputs))
        except Exception as e:  # shapes are propagated on meta tensors, which check no values
            raise InputError(f"the model does not run on example inputs: {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0]}") from e
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
    masked = masked_copy(original, result.plan, len(inputs))
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
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def check(original, result, example_inputs, **tol) -> VerifyReport:
    report = verify(original, result, example_inputs, **tol)
    if not report.ok:
        raise VerificationError(report.message, report)
    return report

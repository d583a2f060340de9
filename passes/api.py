"""The public pipeline: analyze, prune, apply_plan (trace -> analyze -> score -> plan -> rewrite -> verify)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import importance as imp
from . import rewrite
from .channels import ChannelGraph, analyze_graph
from .count import count_module_params
from .errors import InputError, PlanError, VerificationError, first_line
from .labels import unique
from .modules import module_attr
from .plan import Plan, keep_every_dim, select
from .trace import as_inputs, call_whole, check_model, part_inputs, trace
from .verify import VerifyReport, verify as _verify


@dataclass
class LayerWidth:
    name: str
    kind: str
    before: tuple
    after: tuple


@dataclass
class Report:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerWidth]
    pinned: list  # PinnedInfo
    units: int
    units_removed: int
    verify: VerifyReport | None = None
    part: str | None = None  # the submodule pruned (`part=`); the figures above are its own

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "units": self.units, "units_removed": self.units_removed,
            "layers": [vars(l) for l in self.layers],
            "pinned": [vars(p) for p in self.pinned],
            "verify": self.verify.to_dict() if self.verify else None,
            "part": self.part,
        }

    def summary(self) -> str:
        return ((f"part '{self.part}': " if self.part else "") + f"params {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_after / max(self.params_before, 1):.1%}), "
                f"MACs {self.macs_before:,} -> {self.macs_after:,} "
                f"({self.macs_after / max(self.macs_before, 1):.1%}), "
                f"{self.units_removed}/{self.units} units removed")


@dataclass
class PruneResult:
    model: torch.nn.Module  # the traced model itself, or a GraphModule (see `rewrite.follows`)
    plan: Plan
    report: Report
    graph: ChannelGraph = field(repr=False)
    removed_units: np.ndarray = field(repr=False)
    part: str | None = None  # `part=`: `model` is the whole model, `graph` and `plan` the part's


def analyze(model: torch.nn.Module, example_inputs, *, part: str | None = None) -> ChannelGraph:
    """Trace and analyse without changing anything: units, groups, pins with reasons. With
    `part`, of that submodule, on the inputs it receives (see `prune`)."""
    check_model(model)
    if part is not None:
        model, example_inputs = part_inputs(model, part, example_inputs)
    return analyze_graph(trace(_copy(model), as_inputs(example_inputs)))


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise InputError(f"cannot copy {type(model).__name__} ({type(e).__name__}: {e}); pass "
                         f"inplace=True to prune it without a copy (the model object becomes the "
                         f"pruned one)") from e


def _check_args(ratio, round_to, max_ratio, ratios):
    for name, r in [("ratio", ratio), ("max_ratio", max_ratio), *((f"ratios[{k!r}]", v) for k, v in (ratios or {}).items())]:
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0 <= r < 1) or math.isnan(r):
            raise InputError(f"{name} must be a number in [0, 1), got {r!r}")
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to <= 0):
        raise InputError(f"round_to must be a positive integer or None, got {round_to!r}")


def _module_names(model: torch.nn.Module, items, what: str, named: dict | None = None) -> list[str]:
    """Qualified names of `items` (modules or names); `named`: the model's dict(named_modules())."""
    if isinstance(items, (list, tuple, dict)) and not items:
        return []
    by_id = {id(m): n for n, m in (model.named_modules() if named is None else named.items())}
    names = set(by_id.values())
    if isinstance(items, (str, torch.nn.Module)):
        items = [items]
    out = []
    for it in items:
        if isinstance(it, str):
            if it not in names:
                raise InputError(f"{what} names module {it!r}, which the model does not have")
            out.append(it)
        elif isinstance(it, torch.nn.Module) and id(it) in by_id:
            out.append(by_id[id(it)])
        else:
            raise InputError(f"{what} entry {it!r} is not a submodule of the model (pass the module or its name)")
    return out


def _producer_roots(cg: ChannelGraph, prefixes: list[str]) -> dict[str, np.ndarray]:
    """Per module name: roots of the channel classes its parameters produce (non-passive dims)."""
    out = {}
    for p in prefixes:
        roots = []
        for name, labs in cg.param_labels.items():
            if name == p or name.startswith(p + ".") or p == "":
                for d, arr in enumerate(labs):
                    if (name, d) not in cg.passive and arr.any():
                        roots.append(cg.roots[arr])
        out[p] = unique(np.concatenate(roots)) if roots else np.zeros(0, np.int64)
    return out


def _widths(named_modules) -> dict[str, tuple[str, tuple]]:
    """Per module with a weight: (type, weight shape); attention reports its input projection."""
    out = {}
    for n, m in named_modules:
        w = _weight(m)
        if w is not None:
            out[n] = (type(m).__name__, tuple(w.shape))
    return out


def _weight(m: torch.nn.Module) -> torch.Tensor | None:
    """`m.in_proj_weight`, else `m.weight`, if it is a tensor, else None (a parameter, a buffer,
    a plain tensor or a property: `module_attr`, without an exception for a missing name)."""
    for name in ("in_proj_weight", "weight"):
        v = module_attr(m, name, None)
        if isinstance(v, torch.Tensor):
            return v
    return None


def prune(model: torch.nn.Module, example_inputs, *, ratio: float = 0.5, importance: str = "l2",
          global_pruning: bool = False, round_to: int | None = None, ignored_layers=(),
          ratios: dict | None = None, max_ratio: float = 0.9, inplace: bool = False,
          verify: bool = True, seed: int = 0, atol: float = 1e-5, rtol: float = 1e-4,
          part: str | None = None) -> PruneResult:
    """Remove the lowest-importance channels; return a physically smaller, verified model.

    `part`: prune only this submodule (a qualified name), for a model fx cannot trace whole
    (a detector loops over its list of images; its backbone traces). `example_inputs` is then
    what the whole model is called with (a tuple of positional arguments, or its one argument:
    `[image]` for a detector); the model runs once on it and the part is pruned and verified
    on the inputs it received. The part's outputs are never pruned, so the rest of the model
    receives the widths it expects; `ignored_layers` and `ratios` name modules of the whole
    model (those outside the part change nothing). `result.model` is the whole model (a copy,
    or the caller's with `inplace=True`), the part in it a pruned GraphModule that keeps the
    part's plain attributes (a detector reads `backbone.out_channels`); the plan, graph and
    report are the part's, and the plan remembers the part for `apply_plan`."""
    if part is not None:
        return _prune_part(model, example_inputs, part, ratio=ratio, importance=importance,
                           global_pruning=global_pruning, round_to=round_to, ignored_layers=ignored_layers,
                           ratios=ratios, max_ratio=max_ratio, inplace=inplace, verify=verify, seed=seed,
                           atol=atol, rtol=rtol)
    _check_args(ratio, round_to, max_ratio, ratios)
    check_model(model)
    inputs = as_inputs(example_inputs)
    named = dict(model.named_modules()) if inplace else None  # in place, the trace reads it too
    ignored = _module_names(model, ignored_layers, "ignored_layers", named)
    per_module = dict(zip(_module_names(model, list((ratios or {}).keys()), "ratios", named), (ratios or {}).values()))
    reference = _copy(model) if (inplace and verify) else model
    work = model if inplace else _copy(model)
    cg = analyze_graph(trace(work, inputs, named))
    score = imp.scores(cg, importance, seed)
    frozen = np.zeros(cg.uf.size, dtype=bool)
    for roots in _producer_roots(cg, ignored).values():
        frozen[roots] = True
    group_ratio = {}
    for name, roots in _producer_roots(cg, list(per_module)).items():
        for r in roots.tolist():
            if cg.group_of[r] >= 0:
                group_ratio[int(cg.group_of[r])] = per_module[name]
    removed = select(cg, score, ratio=ratio, group_ratio=group_ratio, frozen=frozen,
                     global_pruning=global_pruning, max_ratio=max_ratio, round_to=round_to)
    removed = keep_every_dim(cg, removed, score, max_ratio)
    settings = dict(ratio=ratio, importance=importance, global_pruning=global_pruning, round_to=round_to,
                    max_ratio=max_ratio, ignored_layers=ignored, ratios=per_module, seed=seed)
    plan = Plan.from_units(cg, removed, settings)
    return _finish(reference, cg, removed, plan, inputs, work if inplace else None, verify, atol, rtol)


def apply_plan(model: torch.nn.Module, plan: Plan, example_inputs, *, verify: bool = True,
               inplace: bool = False, atol: float = 1e-5, rtol: float = 1e-4) -> PruneResult:
    """Re-apply a saved plan to a fresh instance of the same architecture (to the same part of
    it, for a plan made with `part=`: `example_inputs` are then the whole model's)."""
    if not isinstance(plan, Plan):
        raise PlanError(f"apply_plan needs a passes.Plan, got {type(plan).__name__}: "
                        f"load a saved one with passes.Plan.load(path)")
    check_model(model)
    if plan.settings.get("part"):
        return _in_part(model, example_inputs, plan.settings["part"], inplace, verify,
                        lambda sub, inputs: _apply_plan(sub, plan, inputs, verify, atol, rtol))
    return _apply_plan(model, plan, example_inputs, verify, atol, rtol, inplace)


def _apply_plan(model, plan, example_inputs, verify, atol, rtol, inplace=True) -> PruneResult:
    imp.check_finite(*imp.float_tensors(model))
    inputs = as_inputs(example_inputs)
    reference = _copy(model) if (inplace and verify) else model
    cg = analyze_graph(trace(model if inplace else _copy(model), inputs))
    removed = plan.to_units(cg)
    return _finish(reference, cg, removed, plan, inputs, model if inplace else None, verify, atol, rtol)


def _prune_part(model, example_inputs, part, *, ignored_layers, ratios, inplace, **settings) -> PruneResult:
    """`prune(..., part=)`: the module names the caller gave are made relative to the part."""
    check_model(model)
    _check_args(settings["ratio"], settings["round_to"], settings["max_ratio"], ratios)
    ignored = [r for n in _module_names(model, ignored_layers, "ignored_layers") if (r := _relative(n, part)) is not None]
    names = _module_names(model, list((ratios or {}).keys()), "ratios")
    rel = {r: v for n, v in zip(names, (ratios or {}).values()) if (r := _relative(n, part)) is not None}

    def run(sub, inputs):
        result = prune(sub, inputs, ignored_layers=ignored, ratios=rel, inplace=True, **settings)
        result.plan.settings["part"] = part
        return result
    return _in_part(model, example_inputs, part, inplace, settings["verify"], run)


def _relative(name: str, part: str) -> str | None:
    """A module name of the whole model as a name inside `part` ("" for the part itself), or
    None outside it."""
    return "" if name == part else name[len(part) + 1:] if name.startswith(part + ".") else None


def _in_part(model, example_inputs, part, inplace, verify, run) -> PruneResult:
    """Prune the submodule `part` of `model` (of a copy unless in place) with `run(sub, its
    inputs)` in place; the part keeps its plain attributes; the whole model must still run."""
    work = model if inplace else _copy(model)
    sub, inputs = part_inputs(work, part, example_inputs)
    plain = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"
             and not isinstance(v, (torch.Tensor, torch.nn.Module))}
    result = run(sub, inputs)
    for k, v in plain.items():
        if k not in vars(sub) and not hasattr(type(sub), k):
            setattr(sub, k, v)
    if verify:
        check_whole(work, example_inputs, part, result.report.verify)
    result.report.part = part
    return PruneResult(work, result.plan, result.report, result.graph, result.removed_units, part)


def check_whole(model: torch.nn.Module, example_inputs, part: str, report=None) -> None:
    """The whole model, its part pruned, must still run on `example_inputs`: else a
    VerificationError (carrying the part's verify report, if any)."""
    try:
        call_whole(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - whatever the model raises
        raise VerificationError(f"{type(model).__name__} does not run with its pruned part '{part}': "
                                f"{type(e).__name__}: {first_line(e)}", report) from e


def _become(caller: torch.nn.Module, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """inplace=True: the caller's object turns into the pruned GraphModule (same modules and
    tensors), so it keeps working; its Python forward could not follow the rewritten graph."""
    caller.__dict__.clear()
    caller.__dict__.update(gm.__dict__)
    caller.__class__ = type(gm)
    return caller


def _finish(reference, cg, removed, plan, inputs, caller_model, verify, atol, rtol) -> PruneResult:
    """Rewrite, count, verify. `caller_model` is set when in place. The traced model (the
    caller's or a copy) has its tensors sliced too: it is the pruned model when its own forward
    needs no change (`rewrite.follows`); else the caller's object becomes the GraphModule."""
    # every parameter of the model, as `passes.count`: the graph's tables lack those it never reads
    params0, macs0 = count_module_params(cg.traced.named.values()), cg.traced.macs
    widths0 = _widths(cg.traced.modules.items())
    new, macs1, modules = rewrite.apply(cg, removed)
    if caller_model is not None and new is not caller_model:
        new = cg.traced.gm = modules[""] = _become(caller_model, new)
    params1 = count_module_params(modules.values())
    widths1 = _widths((n, modules[n]) for n in widths0 if n in modules)  # the layers reported
    layers = [LayerWidth(n, k, s, widths1.get(n, (k, s))[1]) for n, (k, s) in widths0.items()]
    report = Report(params0, params1, macs0, macs1, layers, cg.pinned(), len(cg.units), len(removed))
    result = PruneResult(new, plan, report, cg, removed)
    if verify:
        report.verify = _verify(reference, result, inputs, atol=atol, rtol=rtol)
        if not report.verify.ok:
            raise VerificationError(report.verify.message, report.verify)
    return result

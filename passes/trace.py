"""Trace: nn.Module + example inputs -> torch.fx GraphModule with a shape on every tensor node.

`trace(model, example_inputs)` symbolically traces the model (torch.fx) and runs
`torch.fx.passes.shape_prop.ShapeProp` once on the example inputs, so every node carries
`node.meta["tensor_meta"]`. The model is put in eval mode for the shape pass and its training
flags are restored afterwards; nothing else about it is touched. A model fx cannot trace raises
`TraceError` naming the user code line that failed and what to do about it.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError, TraceError

_SUPPORTED_DTYPES = (torch.float32,)


@dataclass
class Traced:
    gm: fx.GraphModule
    example_inputs: tuple


def as_inputs(example_inputs) -> tuple:
    """A tensor or a tuple/list of tensors -> tuple; anything else is an InputError."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")


def check_model(model: torch.nn.Module) -> None:
    """Refuse what the analysis cannot handle soundly: non-float32 weights, NaN/Inf weights."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype not in _SUPPORTED_DTYPES:
            raise InputError(
                f"parameter '{name}' has dtype {t.dtype}; passes works on float32 models: "
                f"call model.float() first and convert the pruned model back afterwards")
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise InputError(f"parameter '{name}' has {bad} NaN/Inf values; "
                             f"importance and equivalence checks need finite weights")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for the duration, with every submodule's training flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def trace(model: torch.nn.Module, example_inputs) -> Traced:
    inputs = as_inputs(example_inputs)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
        raise TraceError(_trace_message(model, e)) from e
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_placeholders != len(inputs):
        raise InputError(
            f"{type(model).__name__}.forward takes {n_placeholders} inputs, example_inputs has {len(inputs)}")
    with eval_mode(gm), torch.no_grad():
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            node = _failing_node(e)
            shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in inputs)
            raise InputError(
                f"the model does not run on example inputs [{shapes}]"
                + (f": node '{node}'" if node else "")
                + f" raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Traced(gm, inputs)


def _failing_node(e: Exception) -> str | None:
    for note in getattr(e, "__notes__", []) or []:
        if "node" in note:
            return note.strip()
    return None


def _trace_message(model: torch.nn.Module, e: Exception) -> str:
    """Name the innermost frame of user code (not torch's) and say what to do."""
    where = ""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if "/torch/" not in fr.filename and "/passes/" not in fr.filename:
            where = f" at {fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`"
            break
    first = (str(e).strip().splitlines() or [""])[0]
    hint = ("the forward uses a traced value in Python control flow or a Python builtin; "
            "make that branch independent of tensor values, or move it into a submodule and "
            "wrap it with torch.fx.wrap so it becomes one opaque node (its channels are then pinned)")
    return f"torch.fx cannot trace {type(model).__name__}{where}: {type(e).__name__}: {first}. Fix: {hint}"

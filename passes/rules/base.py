"""Rule record, argument access, and the rules for graph boundaries and unknown ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx

from ..channels import Ctx, attr_at, describe_target, iter_arrays
from ..trace import OPAQUE


@dataclass(frozen=True)
class Rule:
    labels: Callable[[Ctx, fx.Node], Any]
    rewrite: Optional[Callable[[Any, fx.Node], None]] = None
    shape_args: bool = False


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional argument i or keyword `name` of a node (fx keeps whichever the code used)."""
    if i is not None and len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, i: int, name: str, value: Any) -> None:
    if i is not None and len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def tensor_args(ctx: Ctx, node: fx.Node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for v in _flat_nodes(a):
            if isinstance(ctx.values.get(v.name), tuple) and _is_labels(ctx.values[v.name]):
                out.append(ctx.values[v.name])
    return out


def _flat_nodes(a):
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat_nodes(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_nodes(x)


def _is_labels(v: Any) -> bool:
    return all(isinstance(x, np.ndarray) for x in v)


def _unknown(ctx: Ctx, node: fx.Node):
    reason = ctx.why("no rule for this op")
    if node.op == "call_module":
        cls = type(ctx.module(node))
        failed = ctx.gm.meta.get(OPAQUE, {}).get(f"{cls.__module__}.{cls.__qualname__}")
        if failed is not None:
            reason = ctx.why(f"torch.fx cannot trace {cls.__name__}.forward ({failed}), so the module is "
                             f"kept whole")
    for a in list(node.args) + list(node.kwargs.values()):
        ctx.pin_value(ctx.labels(a), reason)
    if node.op == "call_module":  # parameters of an opaque module stay as they are
        for t in list(ctx.module(node).parameters()) + list(ctx.module(node).buffers()):
            if id(t) in ctx.tensor_names:
                for arr in ctx.tensor_labels(t):
                    ctx.pin(arr, reason)
    return ctx.unlabeled_like(node)


UNKNOWN = Rule(_unknown)


def _placeholder(ctx: Ctx, node: fx.Node):
    return ctx.unlabeled_like(node)


def _output(ctx: Ctx, node: fx.Node):
    ctx.pin_value(ctx.labels(node.args[0]), "model output")
    return None


def _get_attr(ctx: Ctx, node: fx.Node):
    obj = attr_at(ctx.gm, node.target)
    if isinstance(obj, torch.Tensor):
        return ctx.tensor_labels(obj, node.target)
    return None


def _non_tensor(ctx: Ctx, node: fx.Node):
    return None


placeholder = Rule(_placeholder)
output = Rule(_output)
get_attr = Rule(_get_attr)
non_tensor = Rule(_non_tensor)

__all__ = ["Rule", "arg", "set_arg", "tensor_args", "UNKNOWN", "placeholder", "output", "get_attr",
           "non_tensor", "describe_target", "iter_arrays"]

"""Importance criteria: a score per pruning unit (higher = keep).

A unit's score adds up, over every parameter slice it removes (producer rows, biases, norm
affine parameters, consumer columns), the slice's norm: `l1` sums |w|, `l2` sums the slices'
L2 norms, `random` draws a seeded uniform number. Buffers (running statistics) and tensor
constants are not weights and add nothing. Scores are comparable within a group; global
ranking normalises them by the group mean (see `passes.plan`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .channels import ChannelGraph
from .errors import InputError

CRITERIA = ("l1", "l2", "random")


def _slice_sums(t: torch.Tensor, dims: list[int], kind: str, scratch: torch.Tensor) -> list[torch.Tensor]:
    """Sum of |w| (l1) or of w^2 (l2) over every slice along each of `dims`, float32, of a
    tensor with at least 2 dims.

    |w| or w^2 is written once into `scratch` (a buffer reused across tensors: a fresh one per
    tensor spent its time in page faults), then viewed as (before, d, after) and summed over the
    leading block first (row adds), then the trailing one. Measured on resnet50's convs: 3-4x
    faster than `linalg.vector_norm` per dim, whose reductions over inner dims are strided."""
    x = t.detach().contiguous()
    p = scratch[: x.numel()].view(x.shape)
    torch.abs(x, out=p) if kind == "l1" else torch.square(x, out=p)
    out = []
    for d in dims:
        q = p.view(math.prod(x.shape[:d]), x.shape[d], -1)
        out.append((q.sum(0) if q.shape[0] > 1 else q[0]).sum(1))
    return out


@torch.no_grad()
def scores(cg: ChannelGraph, criterion: str = "l2", seed: int = 0) -> np.ndarray:
    """Score per atom-class root (index by unit root); only `cg.units` entries are meaningful.

    Also refuses NaN/Inf weights and buffers (`InputError` naming the tensor): the slice norms
    computed for scoring read every scored parameter anyway, so only the rest is summed here.
    The per-slice sums of all tensors are joined before the square roots, the conversion to
    float64 and the finiteness test (one op each instead of one per parameter dim); a bias or
    norm vector's slices are its entries, taken for all vectors at once."""
    if criterion not in CRITERIA:
        raise InputError(f"importance must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    out = np.zeros(cg.uf.size, dtype=np.float64)
    params = cg.traced.params  # buffers (running stats) are not weights
    tensors = {n: t for table in (params, cg.traced.buffers) for n, t in table.items() if t.is_floating_point()}
    if criterion == "random":
        check_finite(tensors)
        out[cg.units] = np.random.default_rng(seed).random(len(cg.units))
        return out
    is_unit = np.zeros(cg.uf.size, dtype=bool)
    is_unit[cg.units] = True
    seg = cg.param_segments
    with_units: dict[str, list[int]] = {}  # per parameter, its dims with units (pinned dims score nothing)
    if seg.arrays:
        for i in np.flatnonzero(seg.count(is_unit[cg.roots])[0]).tolist():
            name, d = seg.keys[i]
            with_units.setdefault(name, []).append(d)
    work = [(name, tensors.pop(name), cg.param_labels[name], dims) for name, dims in with_units.items()
            if name in params and name in tensors]
    sums, sum_roots, vectors, vector_roots = [], [], [], []
    if not work:
        check_finite(tensors)
        return out
    scratch = torch.empty(max((t.numel() for _, t, _, _ in work if t.dim() > 1), default=0))
    for name, t, labs, dims in work:
        if t.dim() == 1:
            vectors.append(t.detach())
            vector_roots.append(cg.roots[labs[0]])
            continue
        sums += _slice_sums(t, dims, criterion, scratch)
        sum_roots += [cg.roots[labs[d]] for d in dims]
    norms = []
    if sums:
        s = torch.cat(sums)
        norms.append((s if criterion == "l1" else s.sqrt()).double().numpy())
    if vectors:
        norms.append(torch.cat(vectors).abs().double().numpy())
    norms = np.concatenate(norms)
    if not np.isfinite(norms).all():  # every element is in one slice of each dim: name the tensor
        check_finite({name: t for name, t, _, _ in work})
    check_finite(tensors)
    return np.bincount(np.concatenate(sum_roots + vector_roots), norms, minlength=cg.uf.size)


def float_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers by name: what `check_finite` checks."""
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """InputError naming the first tensor with NaN/Inf values (one sum per tensor, then a count
    only for a tensor whose sum is not finite: a sum can overflow where no value is Inf)."""
    if not tensors:
        return
    names = list(tensors)
    with torch.no_grad():
        sums = torch.stack([tensors[n].detach().sum().float() for n in names])
        for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
            bad = int((~torch.isfinite(tensors[names[i]])).sum())
            if bad:
                raise InputError(f"parameter '{names[i]}' has {bad} NaN/Inf values; "
                                 f"importance and equivalence checks need finite weights")

"""Importance criteria: a score per pruning unit (higher = keep).

A unit's score adds up, over every parameter slice it removes (producer rows, biases, norm
affine parameters, consumer columns), the slice's norm: `l1` sums |w|, `l2` sums the slices'
L2 norms, `random` draws a seeded uniform number. Scores are comparable within a group; global
ranking normalises them by the group mean (see `passes.plan`).
"""

from __future__ import annotations

import numpy as np
import torch

from .channels import ChannelGraph, attr_at
from .errors import InputError

CRITERIA = ("l1", "l2", "random")


def _slice_norms(t: torch.Tensor, dims: list[int], kind: str) -> list[np.ndarray]:
    """L1 or L2 norm of every slice along each of `dims` (one fused reduction per dim)."""
    order = 1 if kind == "l1" else 2
    with torch.no_grad():
        x = t.detach()
        out = []
        for d in dims:
            other = [k for k in range(x.dim()) if k != d]
            s = torch.linalg.vector_norm(x, ord=order, dim=other) if other else x.abs()
            out.append(s.float().numpy())
    return out


def scores(cg: ChannelGraph, criterion: str = "l2", seed: int = 0) -> np.ndarray:
    """Score per atom-class root (index by unit root); only `cg.units` entries are meaningful."""
    if criterion not in CRITERIA:
        raise InputError(f"importance must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    out = np.zeros(cg.uf.size, dtype=np.float64)
    if criterion == "random":
        out[cg.units] = np.random.default_rng(seed).random(len(cg.units))
        return out
    for name, labs in cg.param_labels.items():
        t = attr_at(cg.gm, name)
        dims = [d for d, arr in enumerate(labs) if arr.any()]
        if dims and t.is_floating_point():  # index buffers carry no importance
            for d, norms in zip(dims, _slice_norms(t, dims, criterion)):
                np.add.at(out, cg.roots[labs[d]], norms)
    return out

"""Plan: which units go, chosen by ratio/round_to/max_ratio; JSON round-trip with a fingerprint.

Selection counts units per group. A group of n units keeps `int(n * (1 - ratio))` (the same
convention as Torch-Pruning), at least `ceil(n * (1 - max_ratio))` and at least one; with
`round_to` the kept count is rounded to the nearest multiple (never below `round_to`, never
above n). Local ranking removes the lowest-scored units inside each group; global ranking
normalises scores by their group's mean and removes the lowest across all groups until the
same total is removed, within each group's max_ratio.

A saved plan lists, per parameter and dimension, the removed indices. It carries a fingerprint
of the architecture (graph ops and targets, parameter names and shapes), so it is refused for
another architecture and re-applies exactly to a fresh instance of the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from .channels import ChannelGraph, describe_target
from .errors import PlanError
from .labels import unique
from .trace import Traced


def kept_count(n: int, ratio: float, max_ratio: float, round_to: int | None) -> int:
    k = int(n * (1 - ratio) + 1e-9)
    k = max(k, math.ceil(n * (1 - max_ratio) - 1e-9), 1)
    if round_to:
        k = max(round_to, int(round(k / round_to)) * round_to)
    return min(k, n)


def select(cg: ChannelGraph, score: np.ndarray, *, ratio: float, group_ratio: dict[int, float],
           frozen: np.ndarray, global_pruning: bool, max_ratio: float, round_to: int | None) -> np.ndarray:
    """Roots of the units to remove. `frozen` marks roots that must stay (ignored layers)."""
    removed: list[np.ndarray] = []
    cands = [g.units[~frozen[g.units]] for g in cg.groups]
    if not global_pruning:
        for g, units in zip(cg.groups, cands):
            n = len(units)
            if n == 0:
                continue
            k = kept_count(n, group_ratio.get(g.id, ratio), max_ratio, round_to)
            order = units[np.argsort(score[units], kind="stable")]
            removed.append(order[: n - k])
        return np.concatenate(removed) if removed else np.zeros(0, np.int64)
    # global: rank normalised scores across groups
    rows = []
    target = 0
    for g, units in zip(cg.groups, cands):
        n = len(units)
        if n == 0:
            continue
        r = group_ratio.get(g.id, ratio)
        target += n - int(n * (1 - r) + 1e-9)
        cap = n - max(math.ceil(n * (1 - max_ratio) - 1e-9), 1)
        s = score[units] / (score[units].mean() + 1e-12)
        rows.append((g.id, units, s, cap))
    flat = [(s_, gid, u) for gid, units, s, _ in rows for s_, u in zip(s.tolist(), units.tolist())]
    flat.sort()
    caps = {gid: cap for gid, _, _, cap in rows}
    taken: dict[int, list[int]] = {gid: [] for gid, *_ in rows}
    total = 0
    for s_, gid, u in flat:
        if total >= target:
            break
        if len(taken[gid]) < caps[gid]:
            taken[gid].append(u)
            total += 1
    for gid, units, _, _ in rows:
        t = taken[gid]
        if round_to and t:
            n = len(units)
            k = min(n, max(round_to, int(math.ceil((n - len(t)) / round_to)) * round_to))
            t = t[: n - k]
        removed.append(np.array(t, dtype=np.int64))
    return np.concatenate(removed) if removed else np.zeros(0, np.int64)


def keep_every_dim(cg: ChannelGraph, removed: np.ndarray, score: np.ndarray, max_ratio: float) -> np.ndarray:
    """Give back the best removed units of any tensor dim that would keep fewer than
    max(1, ceil(n * (1 - max_ratio))) of its n positions. Groups bound ratios per group, but
    one group can span several dims (a chunk of a shuffled tensor); no dim may empty out.

    Every dim is counted at once; only the dims found short are then fixed one by one (giving
    units back never makes another dim short)."""
    root_removed = np.zeros(cg.uf.size, dtype=bool)
    root_removed[removed] = True
    seg = cg.label_segments
    if not seg.arrays:
        return removed
    lengths, arrays = seg.lengths, seg.arrays
    gone, _ = seg.count(root_removed[cg.roots])
    kept = lengths - gone
    need = np.maximum(1, np.ceil(lengths * (1 - max_ratio) - 1e-9).astype(np.int64))
    for i in np.flatnonzero(kept < need).tolist():
        r = cg.roots[arrays[i]]
        rm = root_removed[r]
        missing = int(need[i]) - (len(r) - int(rm.sum()))
        if missing <= 0:
            continue
        units, per = unique(r[rm], return_counts=True)
        for j in np.argsort(-score[units], kind="stable"):
            root_removed[units[j]] = False
            missing -= per[j]
            if missing <= 0:
                break
    return removed[root_removed[removed]]


def fingerprint(traced: Traced) -> str:
    """Of the traced graph (ops, targets, module types) and the parameter and buffer shapes."""
    modules = traced.modules
    lines = [f"{n.op}|{describe_target(n)}|{type(modules[n.target]).__name__ if n.op == 'call_module' else ''}\n"
             for n in traced.gm.graph.nodes]
    lines += [f"{name}|{tuple(t.shape)}\n" for table in (traced.params, traced.buffers) for name, t in table.items()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]  # = the lines hashed one by one


class Plan:
    """What a prune removes: per parameter name, per dimension, the removed indices.

    `removed` lists them as Python ints. A plan made by a prune holds the int64 arrays the
    analysis located them in and makes those lists the first time `removed` is read (resnet50
    at ratio 0.5: 78,688 ints, about a millisecond, which prune, verify and rewrite do not
    need); `indices()` gives the arrays, or the lists once made (then they are what counts:
    a caller may edit them)."""

    def __init__(self, removed: dict, fingerprint: str, settings: dict | None = None):
        self._removed = removed  # name -> dim -> list of ints, or int64 array until `removed` is read
        self._lists = all(not isinstance(v, np.ndarray) for dims in removed.values() for v in dims.values())
        self.fingerprint = fingerprint
        self.settings = {} if settings is None else settings

    @property
    def removed(self) -> dict[str, dict[int, list[int]]]:
        if not self._lists:
            self._removed = {k: {d: v.tolist() if isinstance(v, np.ndarray) else v for d, v in dims.items()}
                             for k, dims in self._removed.items()}
            self._lists = True
        return self._removed

    @removed.setter
    def removed(self, value: dict) -> None:
        self._removed, self._lists = value, True

    def indices(self):
        """(parameter name, dim, removed indices) for every cut dim, the indices as stored."""
        for name, dims in self._removed.items():
            for d, idx in dims.items():
                yield name, d, idx

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and (self.fingerprint, self.settings, self.removed) == \
            (other.fingerprint, other.settings, other.removed)

    def __repr__(self) -> str:
        dims = sum(len(d) for d in self._removed.values())
        return f"Plan({len(self._removed)} tensors, {dims} cut dims, fingerprint={self.fingerprint!r}, settings={self.settings!r})"

    @classmethod
    def from_units(cls, cg: ChannelGraph, removed_roots: np.ndarray, settings: dict) -> "Plan":
        removed: dict[str, dict[int, np.ndarray]] = {}
        for name, d, positions in cut_dims(cg, removed_mask(cg, removed_roots)):
            removed.setdefault(name, {})[d] = positions
        return cls(removed, fingerprint(cg.traced), settings)

    def to_units(self, cg: ChannelGraph) -> np.ndarray:
        """The unit roots this plan removes in `cg`; refuses a plan that does not fit."""
        if self.fingerprint != fingerprint(cg.traced):
            raise PlanError(f"plan fingerprint {self.fingerprint} does not match this model "
                            f"({fingerprint(cg.traced)}): the plan was made for another architecture")
        roots = set()
        for name, dims in self.removed.items():
            if name not in cg.param_labels:
                raise PlanError(f"plan removes channels of '{name}', which this model's analysis does not label")
            for d, idx in dims.items():
                arr = cg.param_labels[name][int(d)]
                if max(idx, default=-1) >= len(arr):
                    raise PlanError(f"plan index {max(idx)} out of range for '{name}' dim {d} (size {len(arr)})")
                roots.update(cg.roots[arr[idx]].tolist())
        units = np.array(sorted(roots), dtype=np.int64)
        if units.size and not np.isin(units, cg.units).all():
            raise PlanError("plan removes channels this model pins (model input/output or an op without a rule)")
        if Plan.from_units(cg, units, self.settings).removed != _normalise(self.removed):
            raise PlanError("plan removes a channel without the channels it is coupled to in this model")
        return units

    def to_dict(self) -> dict:
        return {"format": "passes.plan/1", "fingerprint": self.fingerprint, "settings": self.settings,
                "removed": {k: {str(d): v for d, v in dims.items()} for k, dims in self.removed.items()}}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from e
        if data.get("format") != "passes.plan/1":
            raise PlanError(f"{path} is not a passes plan (format {data.get('format')!r})")
        return cls(_normalise(data["removed"]), data["fingerprint"], data.get("settings", {}))


def _normalise(removed: dict) -> dict:
    return {k: {int(d): list(v) for d, v in dims.items()} for k, dims in removed.items()}


def cut_dims(cg: ChannelGraph, atom_removed: np.ndarray, kept: bool = False) -> list:
    """(name, dim, positions) for every labelled tensor dim that loses positions, given a
    removed flag per atom: the removed positions, or with `kept` the kept ones (int64 arrays).
    All dims are counted and located in one vectorised pass."""
    seg = cg.param_segments
    if not seg.arrays:
        return []
    gone, flat = seg.count(atom_removed)
    which = np.flatnonzero(gone)
    found = seg.positions(~flat, seg.lengths - gone, which) if kept else seg.positions(flat, gone, which)
    return [(*seg.keys[i], p) for i, p in zip(which.tolist(), found)]


def removed_mask(cg: ChannelGraph, removed_roots: np.ndarray) -> np.ndarray:
    """Per atom id: is its position removed."""
    root_removed = np.zeros(cg.uf.size, dtype=bool)
    root_removed[removed_roots] = True
    return root_removed[cg.roots]

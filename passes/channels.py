"""Channel analysis: run the label rules over a traced graph and group atoms into pruning units.

`analyze_graph(traced)` walks the fx graph once in topological order. Each node's rule (the one
table in `passes.rules`) reads the labels of its inputs and returns the labels of its output,
unifying and pinning atoms on the way (see `passes.labels`). The result, `ChannelGraph`, holds:

- `units`: the union-find classes that can be removed: they appear in a parameter that
  produces channels (conv/linear output rows, loose parameters) and in an activation, and no
  rule pinned them;
- `groups`: units that share a producing parameter dimension (the channels of one layer and
  everything coupled to it); ratios, ranking and round_to apply per group;
- `pins`: why each pinned channel is pinned (model input/output, an op without a rule, ...);
- `reductions`: nodes that sum, average or normalise over a channel dim; `verify` uses them
  to decide where masked equivalence is exact.

Analysis never mutates the model: it only reads the GraphModule and writes its own records.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from . import labels as L
from .errors import AnalysisError
from .modules import module_attr
from .trace import Traced


@dataclass
class SizeVal:
    """An int (or float) computed from the size of channel dims: its atoms."""

    atoms: np.ndarray


@dataclass
class Reduction:
    node: str
    arg: int  # which positional argument holds the reduced tensor
    dims: tuple  # dims of that argument reduced over
    kind: str  # "sum" (exact when removed positions are zeroed), "mean", "norm", "softmax", "max"
    labels: tuple  # labels of those dims


@dataclass
class SplitChoice:
    """A view that split a channel dim with no structure to follow: the part that kept the
    labels (see `passes.labels.split`) and the channels split (afterwards all in that part's
    classes)."""

    node: str
    first: int  # the split's first output dim
    sizes: tuple
    part: int
    atoms: np.ndarray


@dataclass
class PinRecord:
    atoms: np.ndarray
    reason: str
    node: str


class Ctx:
    """What a rule sees: labels of values, the module table, and the ways to relate atoms."""

    def __init__(self, traced: Traced, split_parts: dict | None = None):
        self.gm = traced.gm
        self.split_parts = split_parts or {}  # (node, first dim) -> (sizes, part): moved splits
        self.splits: list[SplitChoice] = []
        self.uf = L.UnionFind()
        self.values: dict[str, Any] = {}
        self.pins: list[PinRecord] = []
        self.reductions: list[Reduction] = []
        self.param_labels: dict[str, L.Labels] = {}
        self.passive: set[tuple[str, int]] = set()
        self.active: list[np.ndarray] = []  # atoms an opaque op computes with (no traced activation)
        self.producers: list[tuple[str, np.ndarray]] = []  # producer slices declared by rules
        self.modules = traced.modules
        self.conv_weights = traced.conv_weights
        self.tensor_names: dict[int, str] = {}
        for table in (traced.params, traced.buffers):
            for name, t in table.items():
                self.tensor_names.setdefault(id(t), name)
        self.node: fx.Node | None = None

    # -- relating atoms -------------------------------------------------------------------
    def pin(self, atoms: np.ndarray, reason) -> None:
        atoms = atoms[atoms != 0]
        if atoms.size:
            self.pins.append(PinRecord(atoms, str(reason), self.node.name if self.node else ""))

    def pin_value(self, value: Any, reason: str) -> None:
        for arr in iter_arrays(value):
            self.pin(arr, reason)

    def pin_sizes(self, value: Any, what: str) -> None:
        """Pin the channel counts (`SizeVal`s) in `value`, an argument's labels."""
        for v in _flat(value):
            if isinstance(v, SizeVal):
                self.pin(v.atoms, self.why(what))

    def unify(self, a: np.ndarray, b: np.ndarray, reason: str | None = None) -> None:
        L.unify(self.uf, self.pin, a, b, reason or self.why("meets a non-channel dim"))

    def choose_split(self, first: int, sizes, part: int, atoms: np.ndarray) -> int:
        """The part of a view's split that keeps the labels: `part` (the largest), or the one
        a previous analysis moved it to; recorded either way."""
        moved = self.split_parts.get((self.node.name, first))
        if moved is not None and moved[0] == tuple(sizes):
            part = moved[1]
        self.splits.append(SplitChoice(self.node.name, first, tuple(sizes), part, atoms))  # a fresh merge
        return part

    def why(self, what: str) -> "Why":
        """The reason `what` at the current node; its text is made only if a pin records it."""
        return Why(what, self.node)

    def reduce(self, arg: int, dims: Iterable[int], kind: str, value: L.Labels) -> None:
        dims = tuple(d % len(value) for d in dims)
        if any(value[d].any() for d in dims):
            self.reductions.append(Reduction(self.node.name, arg, dims, kind, tuple(value[d] for d in dims)))

    # -- reading values ---------------------------------------------------------------------
    def labels(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.values.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.labels(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.labels(v) for k, v in arg.items()}
        return None

    def tensor_labels(self, t: torch.Tensor, name: str | None = None, share: dict | None = None) -> L.Labels:
        """Labels of a parameter, buffer or constant; fresh atoms the first time it is seen, in
        every dim of more than one position except the kernel dims of a conv module's weight:
        those are never channels, whatever reads the weight (timm's StdConv standardises it
        through a reshape that merges them with the input channels, which had reported each
        kernel position as a pinned channel).

        `share`: dim -> the labels the rule is about to unify that dim with (a layer's input
        channels, a bias's output rows). The first time the tensor is seen such a dim carries
        that very array instead of fresh atoms, when every position of it is a channel: the
        same classes the unification would make, without it (the rule's `unify` of an array
        with itself returns at once). Where a position is not a channel the dim takes fresh
        atoms and the unification pins them, as before."""
        key = self.tensor_names.get(id(t)) or name
        if key is None:
            raise AnalysisError(f"tensor of shape {tuple(t.shape)} is not an attribute of the model")
        if key not in self.param_labels:
            channel_dims = 2 if key in self.conv_weights else t.dim()
            labels = []
            for d, s in enumerate(t.shape):
                given = share.get(d) if share else None
                if s > 1 and d < channel_dims:
                    labels.append(given if given is not None and len(given) == s and np.count_nonzero(given) == s
                                  else self.uf.fresh(s))
                else:
                    labels.append(L.zeros(s))
            self.param_labels[key] = tuple(labels)
        return self.param_labels[key]

    def tie(self, t: torch.Tensor, labels: L.Labels, reason: str) -> None:
        """Tensor `t` carries exactly `labels` (e.g. a norm's per-channel parameters). The first
        time it is seen its labels are those very arrays (no fresh atoms, nothing to unite; label
        arrays are never written to, and `Segments` counts an array shared by several tensors
        once); after that each dim is unified with them."""
        key = self.tensor_names.get(id(t))
        if key is not None and key not in self.param_labels:
            self.param_labels[key] = tuple(labels)
            return
        for a, b in zip(self.tensor_labels(t), labels):
            self.unify(a, b, reason)

    def param(self, module: torch.nn.Module, attr: str, share: dict | None = None) -> L.Labels | None:
        """Labels of a module's tensor (None if it has none); `share` as in `tensor_labels`."""
        t = module_attr(module, attr, None)
        return None if t is None else self.tensor_labels(t, share=share)

    def mark_active(self, *arrays: np.ndarray) -> None:
        """Channels a leaf module or wrapped function computes internally (attention heads):
        they never show up in a traced activation but are as real as those that do."""
        self.active.extend(arrays)

    def mark_producer(self, name: str, atoms: np.ndarray) -> None:
        """A slice of a parameter dim that produces one group of channels on its own (the q/k
        rows and the v rows of a fused projection); the whole dim is then marked passive."""
        self.producers.append((name, atoms))

    def mark_passive(self, module: torch.nn.Module | None, attr_or_tensor: Any, *dims: int) -> None:
        t = module_attr(module, attr_or_tensor, None) if module is not None else attr_or_tensor
        if isinstance(t, torch.Tensor):
            name = self.tensor_names.get(id(t))
            for d in dims or range(t.dim()):
                self.passive.add((name, d % max(t.dim(), 1)))

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.modules[node.target]

    def shape(self, node: fx.Node) -> tuple:
        return tuple(node.meta["tensor_meta"].shape)

    def unlabeled_like(self, node: fx.Node) -> Any:
        return map_meta(node.meta.get("tensor_meta"), lambda m: L.unlabeled(m.shape))


class Why:
    """A pin reason, formatted when used (rules name a reason for every unification, and
    almost none of them ends in a pin)."""

    __slots__ = ("what", "node")

    def __init__(self, what: str, node: fx.Node | None):
        self.what, self.node = what, node

    def __str__(self) -> str:
        n = self.node
        return f"{self.what} at node '{n.name}' ({describe_target(n)})" if n is not None else self.what


def attr_at(root: Any, dotted: str) -> Any:
    """`root.a.b.c` for the dotted path "a.b.c" (parameters, buffers, graph constants)."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def iter_arrays(value: Any, sizes: bool = True):
    """Every atom array inside a value (tensor labels, tuples of them, SizeVals if `sizes`)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, SizeVal):
        if sizes:
            yield value.atoms
    elif isinstance(value, (list, tuple)):
        for v in value:
            if type(v) is np.ndarray:  # a tensor's labels: no generator per array
                yield v
            else:
                yield from iter_arrays(v, sizes)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_arrays(v, sizes)


def map_meta(meta: Any, fn) -> Any:
    if meta is None:
        return None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return fn(meta)
    if isinstance(meta, (list, tuple)):
        return type(meta)(map_meta(m, fn) for m in meta) if not hasattr(meta, "_fields") else tuple(map_meta(m, fn) for m in meta)
    if isinstance(meta, dict):
        return {k: map_meta(v, fn) for k, v in meta.items()}
    return None


def describe_target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {t}"
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", "") or ""
        return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")
    return f"{node.op} {t}"


# ------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Units that share a producing parameter dim: one layer's channels and all coupled to it."""

    id: int
    units: np.ndarray  # unit roots
    producers: list[str]  # "param_name[dim]" of the producing parameter dims
    positions: dict = field(default_factory=dict)  # unit root -> #positions in first producer

    @property
    def size(self) -> int:
        return int(self.units.size)


@dataclass
class PinnedInfo:
    reason: str
    node: str
    channels: int  # distinct channel classes pinned for this reason


@dataclass
class ChannelGraph:
    """Result of the analysis: units, groups, pins, and the labels behind them."""

    traced: Traced
    uf: L.UnionFind
    values: dict
    param_labels: dict
    passive: set
    pins: list
    reductions: list
    roots: np.ndarray = None  # atom -> class root
    units: np.ndarray = None  # roots of removable classes
    groups: list = None
    group_of: np.ndarray = None  # per root: its group id, -1 if not a unit
    pinned_roots: np.ndarray = None
    pin_reason: dict = None  # root -> PinRecord
    splits: list = field(default_factory=list)  # SplitChoice per unstructured split of a view

    @property
    def gm(self) -> fx.GraphModule:
        return self.traced.gm

    @cached_property
    def param_segments(self) -> L.Segments:
        """Every non-empty dim of the labelled parameters, buffers and constants, keyed (name, dim)."""
        dims = [((name, d), arr) for name, labs in self.param_labels.items() for d, arr in enumerate(labs) if len(arr)]
        return L.Segments([a for _, a in dims], [k for k, _ in dims])

    @cached_property
    def label_segments(self) -> L.Segments:
        """Every distinct non-empty label array (by identity: ops that keep their input's labels
        pass the same arrays on, resnet50's 700 activation arrays are 169): of the node values
        (sizes excluded), then of the parameters."""
        arrays = {id(a): a for v in self.values.values() for a in iter_arrays(v, sizes=False) if len(a)}
        arrays.update((id(a), a) for a in self.param_segments.arrays)
        return L.Segments(list(arrays.values()))

    @property
    def unit_group(self) -> dict:
        """Unit root -> group id, as a dict."""
        return dict(zip(self.units.tolist(), self.group_of[self.units].tolist()))

    def classes(self, atoms: np.ndarray) -> np.ndarray:
        return self.roots[atoms]

    def pinned(self) -> list[PinnedInfo]:
        """One line per (reason, node): how many channel classes it pins."""
        seen: dict[tuple[str, str], set] = {}
        for rec in self.pins:
            seen.setdefault((rec.reason, rec.node), set()).update(L.unique(self.roots[rec.atoms]).tolist())
        return [PinnedInfo(r, n, len(s)) for (r, n), s in seen.items()]

    def summary(self) -> str:
        lines = [f"{len(self.units)} units in {len(self.groups)} groups; "
                 f"{len(self.pinned_roots)} channel classes pinned"]
        for g in self.groups[:50]:
            lines.append(f"  group {g.id}: {g.size} units, producers {', '.join(g.producers[:4])}"
                         + (" ..." if len(g.producers) > 4 else ""))
        for p in self.pinned()[:50]:
            lines.append(f"  pinned {p.channels}: {p.reason}")
        return "\n".join(lines)


def analyze_graph(traced: Traced) -> ChannelGraph:
    """Analyse the traced graph. A view that splits a channel dim with no structure to follow
    keeps the labels on its largest part (`passes.labels.split`): `view(B, N, heads, 64)` prunes
    head width. When every channel of such a split ends up pinned (rotary position embeddings
    pair positions within a head and multiply them by per-position tables), the analysis runs
    again with the labels on the next largest part (the heads: whole heads are removed) and the
    run with more removable parameter rows and columns is kept; at most 3 rounds."""
    cg = _analyze(traced, {})
    moved: dict = {}
    for _ in range(3):
        more = _pinned_splits(cg, moved)
        if not more:
            break
        other = _analyze(traced, {**moved, **more})
        if _removable(other) <= _removable(cg):
            break
        cg, moved = other, {**moved, **more}
    return cg


def _pinned_splits(cg: ChannelGraph, moved: dict) -> dict:
    """(node, first dim) -> (sizes, next largest part) for the splits whose channels are all
    pinned and that have not been moved yet."""
    if not cg.splits:
        return {}
    pinned = np.zeros(cg.uf.size, dtype=bool)
    pinned[cg.pinned_roots] = True
    out = {}
    for s in cg.splits:
        key = (s.node, s.first)
        atoms = s.atoms[s.atoms != 0]
        others = [i for i, n in enumerate(s.sizes) if n > 1 and i != s.part]
        if key in moved or key in out or not atoms.size or not others or not pinned[cg.roots[atoms]].all():
            continue
        out[key] = (s.sizes, max(others, key=lambda i: (s.sizes[i], i)))
    return out


def _removable(cg: ChannelGraph) -> int:
    """Parameter rows and columns (positions of labelled parameter dims) in removable units."""
    unit = np.zeros(cg.uf.size, dtype=bool)
    unit[cg.units] = True
    return int(cg.param_segments.count(unit[cg.roots])[0].sum())


def _analyze(traced: Traced, split_parts: dict) -> ChannelGraph:
    from .rules import rule_for  # the table; imported here to keep labels/channels rule-free

    ctx = Ctx(traced, split_parts)
    sized: set[fx.Node] = set()  # nodes whose value holds a channel count (a SizeVal)
    for node in traced.gm.graph.nodes:
        ctx.node = node
        rule = rule_for(node, ctx)
        if not rule.shape_args and any(n in sized for n in node.all_input_nodes):
            _pin_size_values(ctx, node)
        try:
            value = ctx.values[node.name] = rule.labels(ctx, node)
            if _holds_size(value):
                sized.add(node)
        except AnalysisError:
            raise
        except Exception as e:  # a rule bug or an unexpected argument form: name the node
            raise AnalysisError(
                f"analysis failed at node '{node.name}' ({describe_target(node)}): "
                f"{type(e).__name__}: {e}") from e
    ctx.node = None
    return _finish(traced, ctx)


def _holds_size(v: Any) -> bool:
    if isinstance(v, SizeVal):
        return True
    if type(v) is tuple and v and type(v[0]) is np.ndarray:  # a tensor's labels (arrays only)
        return False
    if isinstance(v, (list, tuple)):
        return any(_holds_size(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_size(x) for x in v.values())
    return False


def _pin_size_values(ctx: Ctx, node: fx.Node) -> None:
    """A channel size used as a number (not as a shape) changes meaning when pruned: pin it."""
    if node.op == "call_function" and node.target in _INT_ARITH:
        return
    ctx.pin_sizes(ctx.labels([*node.args, *node.kwargs.values()]), "a channel count is used as a number")


_INT_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
              operator.mod, operator.pow, operator.neg, operator.eq, operator.ne, operator.lt,
              operator.le, operator.gt, operator.ge, operator.getitem}


def _flat(v: Any):
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _flat(x)
    elif v is not None:
        yield v


def _labelled(arr: np.ndarray) -> bool:
    """Some position of `arr` is a channel (a labelled dim's first position usually is)."""
    return len(arr) > 0 and (arr[0] != 0 or np.count_nonzero(arr) > 0)


def _finish(traced: Traced, ctx: Ctx) -> ChannelGraph:
    uf = ctx.uf
    roots = uf.roots()
    cg = ChannelGraph(traced, uf, ctx.values, ctx.param_labels, ctx.passive, ctx.pins, ctx.reductions)
    cg.splits = ctx.splits
    cg.roots = roots
    pinned = np.zeros(uf.size, dtype=bool)
    cg.pin_reason = {}
    for rec in ctx.pins:
        r = roots[rec.atoms]
        cg.pin_reason.update(dict.fromkeys(L.unique(r[~pinned[r]]).tolist(), rec))
        pinned[r] = True
    pinned[0] = True
    cg.pinned_roots = np.flatnonzero(pinned & (roots == np.arange(uf.size)))
    in_act = np.zeros(uf.size, dtype=bool)  # classes seen in an activation (not a get_attr read)
    seen = {id(arr): arr for node in traced.gm.graph.nodes if node.op != "get_attr"  # each array once
            for arr in iter_arrays(ctx.values.get(node.name), sizes=False)}
    if seen or ctx.active:
        in_act[roots[np.concatenate([*seen.values(), *ctx.active])]] = True
    # producer dims: every labelled parameter dim that no rule declared passive. Units that
    # share a producer dim form a group: components of a second union-find over unit roots,
    # whose root is the component's smallest unit (union links the larger root to the smaller).
    groups_uf = L.UnionFind(uf.size)
    groups_uf.size = uf.size
    heads: list[tuple[int, str]] = []
    in_producer = np.zeros(uf.size, dtype=bool)
    dims = [((name, d), arr) for name, labs in ctx.param_labels.items()
            for d, arr in enumerate(labs) if (name, d) not in ctx.passive and _labelled(arr)]
    dims += ctx.producers
    if dims:  # all dims at once: each dim's classes (unpinned, in an activation) join its smallest
        lengths = np.fromiter((len(a) for _, a in dims), dtype=np.int64, count=len(dims))
        r = roots[np.concatenate([a for _, a in dims])]
        dim = np.repeat(np.arange(len(dims)), lengths)
        ok = ~pinned[r] & in_act[r]
        r, dim = r[ok], dim[ok]  # dim ascending: each dim's classes are one run
        starts = np.flatnonzero(np.concatenate([[True], dim[1:] != dim[:-1]])) if r.size else np.zeros(0, np.int64)
        first = np.minimum.reduceat(r, starts) if r.size else r  # smallest class of each dim (no sort)
        in_producer[r] = True
        groups_uf.union(np.repeat(first, np.diff(np.append(starts, r.size))), r)
        for root, i in zip(first.tolist(), dim[starts].tolist()):
            label = dims[i][0]
            heads.append((root, f"{label[0]}[{label[1]}]" if isinstance(label, tuple) else label))
    units = np.flatnonzero(in_producer)
    reps, gid = np.unique(groups_uf.find(units), return_inverse=True)  # ordered by smallest unit
    order = np.argsort(gid, kind="stable")
    bounds = np.searchsorted(gid[order], np.arange(len(reps) + 1))
    names: dict[int, list[str]] = {}
    head_roots = groups_uf.find(np.array([h for h, _ in heads], dtype=np.int64)) if heads else []
    for rep, (_, label) in zip(np.asarray(head_roots).tolist(), heads):
        names.setdefault(rep, []).append(label)
    cg.units = units
    cg.groups = [Group(g, units[order[bounds[g]:bounds[g + 1]]], names.get(int(rep), []))
                 for g, rep in enumerate(reps.tolist())]
    cg.group_of = np.full(uf.size, -1, dtype=np.int64)
    cg.group_of[units] = gid
    return cg

"""Rewrite: apply removed units to the analysed GraphModule, producing a smaller model.

1. Every labelled tensor (parameters, buffers, graph constants) loses the positions whose atom
   class is removed, in every dimension. Tied tensors stay tied.
2. Each node's rule fixes what slicing alone does not (`Rule.rewrite`): literal sizes, module
   attributes, replaced modules.
3. The pruned model is the traced model itself when its own forward computes the rewritten
   graph (no node changed, no module replaced, every parameter reached by the graph: `follows`),
   else the GraphModule, made a plain one with Python code generated once for the rewritten
   graph. The graph runs once through the shape pass; every tensor node must have exactly the
   shape the labels promise (kept positions per dim). A mismatch is a `RewriteError` that names
   the node: a wrong model is never returned silently.

The GraphModule and the traced model are modified in place; `passes.prune` traces a deep copy
of the model unless the caller asked for `inplace=True`. Afterwards the analysis's tables
(`Traced.params`, `.buffers`, `.modules`) hold the pruned model's tensors and modules.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .channels import ChannelGraph, attr_at, describe_target, map_meta
from .errors import RewriteError
from .plan import cut_dims, removed_mask
from .rules import rule_for
from .rules.layers import set_sizes
from .trace import NodeFailure, propagate_shapes


class RewriteCtx:
    """What a rule's rewrite sees: kept counts of label arrays, modules, the original labels."""

    def __init__(self, cg: ChannelGraph, removed_roots: np.ndarray):
        self.cg = cg
        self.gm = cg.gm
        self.removed = removed_mask(cg, removed_roots)
        self.modules = dict(cg.traced.modules)  # a copy: modules replaced by rules go here
        self.replaced = False

    def keep(self, arr: np.ndarray) -> np.ndarray:
        return ~self.removed[arr]

    def count(self, arr: np.ndarray) -> int:
        kept = self.kept.get(id(arr))
        return len(arr) - int(np.count_nonzero(self.removed[arr])) if kept is None else kept

    @cached_property
    def kept(self) -> dict[int, int]:
        """Kept positions of every label array of the analysis, by id (the arrays live as long
        as the analysis), counted in one vectorised pass."""
        seg = self.cg.label_segments
        if not seg.arrays:
            return {}
        return dict(zip(map(id, seg.arrays), (seg.lengths - seg.count(self.removed)[0]).tolist()))

    def labels_of(self, n: Any):
        return self.cg.values.get(n.name) if isinstance(n, fx.Node) else None

    def new_shape(self, node: fx.Node) -> tuple:
        return tuple(self.count(a) for a in self.cg.values[node.name])

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.modules[node.target]

    def replace_module(self, target: str, new: torch.nn.Module) -> None:
        parent, _, leaf = target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, new)
        self.replaced = True
        for name in [n for n in self.modules if n.startswith(target + ".")]:  # the old one's children
            del self.modules[name]
        self.modules.update(new.named_modules(prefix=target))

    def error(self, node: fx.Node, msg: str) -> RewriteError:
        return RewriteError(f"node '{node.name}' ({describe_target(node)}): {msg}")


@torch.no_grad()
def slice_tensors(cg: ChannelGraph, removed: np.ndarray) -> dict[int, torch.Tensor]:
    """Slice every labelled tensor of the GraphModule and of the traced model (the caller's
    when in place, else a copy); returns the new tensors by id of the old ones.

    Each tensor is replaced wherever a module holds it (tied tensors stay tied): in parameter
    and buffer tables and in plain attributes (graph constants), each module visited once."""
    gm = cg.gm
    owned = {**cg.traced.params, **cg.traced.buffers}
    new_by_old: dict[int, torch.Tensor] = {}
    cut: dict[str, list] = {}  # name -> [(dim, kept indices)] for the dims that lose positions
    for name, d, kept in cut_dims(cg, removed, kept=True):
        cut.setdefault(name, []).append((d, torch.from_numpy(kept)))
    # a tensor cut in several dims passes through an intermediate (its first cut): one reused
    # buffer holds the large ones (fresh memory for each was a page fault per 4 KiB, the larger
    # part of the time on ViT-B); one under `_SCRATCH_MIN` values is a fresh tensor, which malloc
    # serves from memory it holds, while a view of the buffer costs more than the copy into it
    # (a 32x64x1x1 intermediate: 7.5 us through the buffer, 3.0 us fresh)
    work = []
    for name, keep in cut.items():
        old = owned.get(name)
        if old is None:
            old = attr_at(gm, name)
        blocks, mid = _blocks(old, keep), 0  # mid: the intermediate's size, if in the buffer
        if len(keep) > 1 and not blocks and old.dtype == torch.float32:
            d, idx = keep[0]
            n = math.prod(old.shape[:d]) * len(idx) * math.prod(old.shape[d + 1:])
            mid = n if n >= _SCRATCH_MIN else 0
        work.append((name, old, keep, blocks, mid))
    scratch = torch.empty(max((mid for *_, mid in work), default=0), dtype=torch.float32)
    for name, old, keep, blocks, mid in work:
        if blocks:
            new = _take_blocks(old, keep[0][1], keep[1][1])
        else:
            new = old
            for j, (d, idx) in enumerate(keep):
                if j == 0 and mid:
                    shape = (*new.shape[:d], len(idx), *new.shape[d + 1:])
                    new = torch.index_select(new, d, idx, out=scratch[:mid].view(shape))
                else:
                    new = _select(new, d, idx)
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)  # index_select copied
        new_by_old[id(old)] = new
    seen: set[int] = set()
    old_ids = new_by_old.keys()  # the old tensors are alive: an equal id is the same object
    # the GraphModule's modules, then the traced model's, listed when it was traced
    for modules in (cg.traced.modules.values(), cg.traced.named.values()):
        for mod in modules:
            if id(mod) in seen:  # the GraphModule shares its submodules with the model it traced
                continue
            seen.add(id(mod))
            # each table is first tested as a whole (ids mapped and matched in C), most hold nothing
            for store in (mod._parameters, mod._buffers):
                if not old_ids.isdisjoint(map(id, store.values())):
                    for k, t in store.items():
                        if id(t) in new_by_old:
                            store[k] = new_by_old[id(t)]
            attrs = vars(mod)  # graph constants, and other references
            if not old_ids.isdisjoint(map(id, attrs.values())):
                for k, v in list(attrs.items()):
                    if id(v) in new_by_old:
                        setattr(mod, k, new_by_old[id(v)])
    return new_by_old


_SCRATCH_MIN = 1 << 15  # elements: a smaller intermediate is a fresh tensor (see slice_tensors)
_GATHER_MIN = 3 << 14  # output elements: below this `index_select` was faster than `gather`


def _select(t: torch.Tensor, d: int, idx: torch.Tensor) -> torch.Tensor:
    """`t.index_select(d, idx)`. A contiguous tensor whose dims after `d` all have size 1 (a
    1x1 conv's input channels, a linear layer's columns) is cut as a (rows, columns) matrix by
    `gather` with the index broadcast over the rows, when it yields at least `_GATHER_MIN`
    values: `index_select` along an inner dim runs on one thread, `gather` on all (resnet50's
    37 matrices cut by columns: 3.0-3.6 -> 2.2-3.1 ms in total), but below that size its
    set-up cost more than the second thread gained; with trailing values, as a 3x3 kernel's,
    `gather` was 6x slower."""
    shape = t.shape
    rows = math.prod(shape[:d])
    if rows == 1 or rows * len(idx) < _GATHER_MIN or math.prod(shape[d + 1:]) != 1 or not t.is_contiguous():
        return t.index_select(d, idx)
    out = torch.gather(t.view(rows, shape[d]), 1, idx.expand(rows, -1))
    return out.view(*shape[:d], len(idx), *shape[d + 1:])


_BLOCKS_MIN = 1 << 18  # elements: below this a row cut then a column cut was faster


def _blocks(t: torch.Tensor, keep: list) -> bool:
    """A contiguous tensor of at least `_BLOCKS_MIN` values cut in its first two dims whose
    trailing dims hold blocks of at least 4 values (a conv kernel): taking whole blocks by their
    flat (row, column) index is one copy, measured at 0.6x the time of a row cut followed by a
    column cut on a 512x512x3x3 conv, 0.8x on 256x256x3x3. For 1x1 kernels and matrices (element
    by element) it was slower, and so it was for small kernels (2x on 64x64x3x3, 1.3x on
    128x128x3x3: the crossover was near 330k values)."""
    return (len(keep) == 2 and keep[0][0] == 0 and keep[1][0] == 1 and t.dim() > 2
            and math.prod(t.shape[2:]) >= 4 and t.numel() >= _BLOCKS_MIN and t.is_contiguous())


def _take_blocks(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`t[rows][:, cols]` for a tensor `_blocks` accepts, in one gather of whole blocks."""
    o, i = t.shape[:2]
    flat = (rows[:, None] * i + cols).view(-1)
    return t.view(o * i, -1).index_select(0, flat).view(len(rows), len(cols), *t.shape[2:])


def apply(cg: ChannelGraph, removed_roots: np.ndarray) -> tuple[torch.nn.Module, int, dict[str, torch.nn.Module]]:
    """Rewrite `cg.gm` in place; returns the pruned model, its MACs on the example inputs, and
    its modules by qualified name (as its named_modules()).

    The pruned model is the traced model itself (`cg.traced.model`, its tensors sliced too)
    when its own forward runs it unchanged (`follows`); otherwise `cg.gm`, turned into a plain
    GraphModule with code generated for the rewritten graph."""
    rctx = RewriteCtx(cg, removed_roots)
    new_by_old = slice_tensors(cg, rctx.removed)
    code = _code(cg.gm.graph)
    for node in list(cg.gm.graph.nodes):
        rule = rule_for(node, rctx)
        if rule.rewrite is not None:
            rule.rewrite(rctx, node)
    model = cg.traced.model
    new = model if follows(cg, rctx, code) else _rebuilt(cg.gm)
    if new is model:
        _set_sizes(cg, new_by_old)
    macs = check_shapes(rctx, cg.traced.example_inputs)
    # the analysis now describes the pruned model (its gm is that model's graph): its tables hold the
    # new tensors and modules, and nothing keeps the old, full-size ones alive
    traced = cg.traced
    traced.params = {n: new_by_old.get(id(t), t) for n, t in traced.params.items()}
    traced.buffers = {n: new_by_old.get(id(t), t) for n, t in traced.buffers.items()}
    traced.modules = rctx.modules if new is not model else traced.named  # no module replaced
    return new, macs, traced.modules


def _code(graph: fx.Graph) -> list:
    """What the generated code of `graph` depends on, node by node."""
    return [(n.op, n.target, n.args, n.kwargs) for n in graph.nodes]


def follows(cg: ChannelGraph, rctx: RewriteCtx, code: list) -> bool:
    """The traced model's own forward computes the rewritten graph: no rule changed a node
    (a literal size, a head count, an op) or replaced a module, every attribute the graph reads
    is the model's own (not a constant the tracer made), and the trace allows it
    (`Traced.own_forward`: every parameter and buffer of the model with more than one element
    is in the graph, so a branch the trace did not take, such as an auxiliary head under
    `if self.training:`, reads none left unpruned; no branch on shapes is checked at run
    time). Forward then differs from the graph only in what the trace fixed and what stays
    true of the pruned model: the training branches it did not take, and the module attributes
    its code reads, which the rules (and `_set_sizes`) keep consistent with the tensors."""
    if not cg.traced.own_forward or rctx.replaced or _code(cg.gm.graph) != code:
        return False
    model = cg.traced.model
    for n in cg.gm.graph.nodes:
        if n.op == "get_attr":
            try:
                if attr_at(model, n.target) is not attr_at(cg.gm, n.target):
                    return False
            except AttributeError:
                return False
    return True


def _set_sizes(cg: ChannelGraph, new_by_old: dict) -> None:
    """The kept model's layers that the graph does not call as modules (fx traced through their
    forward) but whose tensors were sliced take size attributes that match them."""
    leaves = {n.target for n in cg.gm.graph.nodes if n.op == "call_module"}
    sliced = {id(t) for t in new_by_old.values()}
    for name, m in cg.traced.named.items():
        if name not in leaves and not sliced.isdisjoint(map(id, [*m._parameters.values(), *m._buffers.values()])):
            set_sizes(m)


def _rebuilt(gm: fx.GraphModule) -> fx.GraphModule:
    """The traced (lazy) GraphModule turned into a plain one over the rewritten graph, its Python
    code generated once, here. fx gives every GraphModule instance a class of its own; the
    instance takes a fresh plain one (same modules, tensors and training flags: building a new
    GraphModule instead re-created every container module, a third of this step's time)."""
    name = type(gm).__name__
    gm.__class__ = type(fx.GraphModule.__new__(fx.GraphModule))  # a fresh per-instance class
    gm.__class__.__name__ = name
    gm.recompile()
    return gm


def check_shapes(rctx: RewriteCtx, inputs: tuple) -> int:
    """Run the rewritten graph once; every node must have its promised shape. Returns MACs."""
    gm = rctx.gm  # the graph: the pruned model is this GraphModule, or its own forward runs the graph
    try:
        macs = propagate_shapes(gm, inputs, modules=rctx.modules)
    except NodeFailure as e:
        raise RewriteError(f"the rewritten model does not run: {e}") from e.error
    for node in gm.graph.nodes:
        want = rctx.cg.values.get(node.name)
        meta = node.meta.get("tensor_meta")
        got = map_meta(meta, lambda m: tuple(m.shape))
        exp = _expected(rctx, want)
        if exp is not None and got is not None and not _same(exp, got):
            raise rctx.error(node, f"has shape {got} after the rewrite, the plan expects {exp}")
    return macs


def _expected(rctx: RewriteCtx, v: Any):
    if isinstance(v, tuple) and v and all(isinstance(a, np.ndarray) for a in v):
        return tuple(rctx.count(a) for a in v)
    if isinstance(v, tuple) and len(v) == 0:
        return ()
    if isinstance(v, (tuple, list)):
        return tuple(_expected(rctx, x) for x in v)
    return None


def _same(exp: Any, got: Any) -> bool:
    if exp is None or got is None:
        return True
    if isinstance(exp, tuple) and exp and all(isinstance(e, int) for e in exp):
        return tuple(got) == exp
    if isinstance(exp, tuple) and isinstance(got, (tuple, list)):
        if exp == () and tuple(got) == ():
            return True
        return len(exp) == len(got) and all(_same(e, g) for e, g in zip(exp, got))
    return True

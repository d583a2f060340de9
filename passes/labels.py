"""Channel labels: atoms, a vectorised union-find over them, and the label algebra of views.

Every position of every tensor dimension carries an *atom* id (an int64). Atom 0 is special:
it marks a position that is not a channel (batch, spatial, sequence, a size-1 dim, anything
created from literals). A tensor's labels are a tuple with one atom array per dimension.

Ops relate atoms: two positions that must be removed together are *unified*; a position that
must never be removed is *pinned* (with a reason). Atoms that end in the same union-find class
form one pruning unit. Removing a unit deletes every position whose atom is in that class.

The only non-obvious part is reshaping. Merging dims (flatten) repeats the labels of the one
labelled dim over the others; splitting a labelled dim first looks for the dim along which the
classes already vary (this inverts an earlier flatten exactly); when there is none it keeps the
labels on the largest part and unifies across the others (e.g. view(B, N, 12, 64): position d
of every head becomes one unit, i.e. head-width pruning; channel shuffle's (2, C/2) split:
channel i of both halves become one unit). Both choices keep every tensor rectangular.
`passes.channels.analyze_graph` may move a split's labels to another part (`choose`): when all
of its channels end up pinned, e.g. head width under rotary embeddings, whole heads are pruned.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Labels = tuple  # tuple[np.ndarray, ...], one int64 atom array per dimension


class UnionFind:
    """Union-find over int64 atom ids; `union` and `find` take whole arrays.

    Their tests of a whole array (and `unify`'s) count with `np.count_nonzero`: an array's
    `.all()` or `.any()` goes through a Python wrapper in numpy and took 3x as long on these
    small arrays (1.3 against 0.4 us; resnet50's analysis makes about 400 of them)."""

    def __init__(self, capacity: int = 4096):
        self.parent = np.arange(capacity, dtype=np.int64)
        self.size = 1  # atom 0 is the non-channel atom; it is never united with anything

    def fresh(self, n: int) -> np.ndarray:
        if self.size + n > len(self.parent):
            grow = max(len(self.parent), n)
            self.parent = np.concatenate([self.parent, np.arange(len(self.parent), len(self.parent) + grow)])
        ids = np.arange(self.size, self.size + n, dtype=np.int64)
        self.size += n
        return ids

    def find(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[x]
        rr = p[r]
        if not np.count_nonzero(rr != r):  # the common case: every parent is a root, nothing to compress
            return r
        while True:
            r = rr
            rr = p[r]
            if not np.count_nonzero(rr != r):
                break
        p[x] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = self.find(a), self.find(b)
        keep = a != b
        a, b = a[keep], b[keep]
        while a.size:
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            self.parent[hi] = lo  # hi is a root; lo < hi, so no cycles
            if not np.count_nonzero(self.parent[hi] != lo):
                return  # every pair is linked directly
            a, b = self.find(lo), self.find(hi)  # a root paired twice kept one pairing: redo the rest
            keep = a != b
            a, b = a[keep], b[keep]

    def roots(self) -> np.ndarray:
        return self.find(np.arange(self.size, dtype=np.int64))


def unique(a: np.ndarray, return_counts: bool = False):
    """Sorted distinct values (and their counts) of an int array. np.unique does the same but
    costs ~10x more per call on this package's small arrays (measured: 270 vs 28 us for 3,072
    elements), and the analysis calls it once per parameter dim."""
    s = np.sort(np.asarray(a).reshape(-1))
    first = np.ones(s.size, dtype=bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    if not return_counts:
        return s[first]
    starts = np.flatnonzero(first)
    return s[starts], np.diff(np.append(starts, s.size))


class Segments:
    """Label arrays concatenated once, to count flagged atoms per array in one vectorised pass
    (one gather, one cumulative sum read at the array ends) however many arrays there are.

    An array listed under several keys (a norm's weight, bias and running statistics carry the
    very array of the channels they scale, `Ctx.tie`) is concatenated once: counts and
    positions are made per distinct array and handed to each of its keys (resnet50: 159,561
    parameter label positions, 53,321 distinct; a count over them 0.43 -> 0.09 ms, locating
    the cut positions 0.52 -> 0.28 ms)."""

    def __init__(self, arrays: Sequence[np.ndarray], keys: Sequence = ()):
        self.arrays, self.keys = list(arrays), list(keys)
        self.lengths = np.fromiter(map(len, self.arrays), dtype=np.int64, count=len(self.arrays))
        distinct = {id(a): a for a in self.arrays}
        if len(distinct) == len(self.arrays):
            self._slot = None  # each array once: per key = per distinct array
            own = self.arrays
        else:
            index = {k: i for i, k in enumerate(distinct)}
            self._slot = np.fromiter((index[id(a)] for a in self.arrays), dtype=np.int64, count=len(self.arrays))
            own = list(distinct.values())
        self._lengths = self.lengths if self._slot is None else np.fromiter(map(len, own), dtype=np.int64, count=len(own))
        self._ends = np.cumsum(self._lengths)
        self.atoms = np.concatenate(own) if own else np.zeros(0, np.int64)  # each distinct array once
        # running counts in int32 when they fit: half the memory of int64 (0.9 -> 0.7 ms per count
        # of 265,492 positions inside a prune; 3.8 -> 0.4 ms when counted repeatedly alone, where
        # the int64 sum's 2 MB were fresh pages on every call)
        self._count_type = np.int32 if self.atoms.size < 2**31 else np.int64

    def count(self, atom_flag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flagged atoms per array, the flags of the distinct arrays concatenated)."""
        flat = atom_flag[self.atoms]
        total = np.zeros(flat.size + 1, dtype=self._count_type)
        np.cumsum(flat, dtype=self._count_type, out=total[1:])
        counts = (total[self._ends] - total[self._ends - self._lengths]).astype(np.int64, copy=False)
        return (counts if self._slot is None else counts[self._slot]), flat

    def positions(self, flat: np.ndarray, counts: np.ndarray, which: np.ndarray) -> list[np.ndarray]:
        """For the arrays `which` (indices): the positions inside each whose flag in `flat` is
        set, given `counts`, the set flags per array (`flat` and `counts` as `count` returns
        them, or their complements). One nonzero pass over the concatenation; each hit's offset
        is that of its array, repeated per hit; the arrays' positions are then slices (one
        array's, the same object, for all of its keys)."""
        if self._slot is not None:  # per distinct array (its keys' counts are equal)
            own = np.zeros(len(self._lengths), dtype=np.int64)
            own[self._slot] = counts
            counts, which = own, self._slot[which]
        hits = np.flatnonzero(flat) - np.repeat(self._ends - self._lengths, counts)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [hits[a:b] for a, b in zip(bounds[which].tolist(), bounds[which + 1].tolist())]


def zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


def unlabeled(shape: Sequence[int]) -> Labels:
    return tuple(zeros(int(s)) for s in shape)


PinFn = Callable[[np.ndarray, str], None]


def unify(uf: UnionFind, pin: PinFn, a: np.ndarray, b: np.ndarray, reason: str) -> None:
    """Positions i of `a` and `b` are one channel. A channel meeting a non-channel is pinned."""
    if a is b:
        return
    if a.shape != b.shape:
        raise ValueError(f"unify: lengths differ ({a.shape[0]} vs {b.shape[0]})")
    na, nb = np.count_nonzero(a), np.count_nonzero(b)
    if na == a.size and nb == b.size:  # two channel dims (the common case)
        uf.union(a, b)
        return
    if na == nb == 0:  # two non-channel dims (a residual add's spatial dims)
        return
    az, bz = a == 0, b == 0
    both = ~az & ~bz
    if both.any():
        uf.union(a[both], b[both])
    if (az & ~bz).any():
        pin(b[az & ~bz], reason)
    if (bz & ~az).any():
        pin(a[bz & ~az], reason)


def unify_all(uf: UnionFind, pin: PinFn, arrays: Sequence[np.ndarray], reason: str) -> np.ndarray:
    for other in arrays[1:]:
        unify(uf, pin, arrays[0], other, reason)
    return arrays[0]


def merge(pin: PinFn, parts: Sequence[np.ndarray], reason: str) -> np.ndarray:
    """Flatten consecutive dims into one. At most one part stays labelled; extra ones are pinned."""
    labelled = [i for i, p in enumerate(parts) if p.any()]
    for i in labelled[1:]:
        pin(parts[i], reason)
    sizes = [len(p) for p in parts]
    if not labelled:
        return zeros(int(np.prod(sizes)))
    k = labelled[0]
    shape = [1] * len(parts)
    shape[k] = sizes[k]
    return np.broadcast_to(parts[k].reshape(shape), sizes).reshape(-1).copy()


def split(uf: UnionFind, arr: np.ndarray, sizes: Sequence[int], prefer: Sequence[int] = (),
          force: int | None = None, choose: Callable | None = None) -> list[np.ndarray]:
    """Unflatten one dim into `sizes`; see the module docstring for which part keeps labels.
    `prefer`: parts to choose first when none is already structured (sizes computed at run
    time, which the rewrite re-plans); `force`: always this part (channel shuffle);
    `choose(sizes, k, arr)`: told the part k chosen when none is structured, returns the part
    to use (`passes.channels` moves the labels of a split whose channels all end up pinned)."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return [arr]
    if not arr.any():
        return [zeros(s) for s in sizes]
    grid = arr.reshape(sizes)
    classes = uf.find(arr).reshape(sizes)
    out = [zeros(s) for s in sizes]
    for k, s in enumerate(sizes):
        if s == 1 or force is not None:
            continue
        first = _first_along(classes, k)
        if np.array_equal(np.broadcast_to(first, classes.shape), classes):
            out[k] = _first_along(grid, k).reshape(-1)
            return out
    cands = [i for i in prefer if sizes[i] > 1] or range(len(sizes))
    k = force if force is not None else max(cands, key=lambda i: (sizes[i], -i))
    if choose is not None and force is None:
        k = choose(sizes, k, arr)
    moved = np.moveaxis(grid, k, 0).reshape(sizes[k], -1)
    for col in range(1, moved.shape[1]):
        uf.union(moved[:, 0], moved[:, col])
    out[k] = moved[:, 0].copy()
    return out


def _first_along(a: np.ndarray, k: int) -> np.ndarray:
    """`a` indexed at 0 on every axis but k, keeping dims (broadcastable back to a.shape)."""
    idx = tuple(slice(None) if i == k else slice(0, 1) for i in range(a.ndim))
    return a[idx]


def reshape(uf: UnionFind, pin: PinFn, labels: Labels, in_shape: Sequence[int],
            out_shape: Sequence[int], reason: str, computed: Sequence[int] = (),
            choose: Callable | None = None) -> Labels:
    """Labels of `x.view(out_shape)` given the labels of x (shapes fully known, no -1).
    `computed`: output dims whose size the code computes at run time; `choose(first, sizes, k, arr)`:
    the part of a split that keeps the labels, for the split producing output dims from
    `first` on (see `split`)."""
    in_shape, out_shape = [int(s) for s in in_shape], [int(s) for s in out_shape]
    out: list[np.ndarray] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        # skip size-1 dims on both sides (they carry no channels)
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            if labels[i].any():
                pin(labels[i], reason)
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            out.append(zeros(1))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i); pi *= in_shape[i]; i += 1
            else:
                gj.append(j); pj *= out_shape[j]; j += 1
        flat = merge(pin, [labels[k] for k in gi], reason)
        first = gj[0]
        out.extend(split(uf, flat, [out_shape[k] for k in gj],
                         prefer=[n for n, k in enumerate(gj) if k in computed],
                         choose=None if choose is None else (lambda sizes, k, arr, f=first: choose(f, sizes, k, arr))))
    return tuple(out)

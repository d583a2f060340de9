"""ONNX Runtime latency benchmark: several models, one process, calls interleaved.

`benchmark([original, pruned, ...], inputs)` takes .onnx files or nn.Modules (exported first
with `export_onnx`, parity-checked, to a temporary file), creates one InferenceSession per model
before any timing, runs `warmup` calls each, then `runs` rounds that call every model once,
timing every call with `time.perf_counter`. Round r starts with model r mod n (A B C, B C A,
...): a call right after a large model was measured ~20% slower here, so every model takes
every position equally. Interleaving spreads machine noise (thermal, other processes) evenly
over the models, so the ratios are fairer than the absolute times.

Every session has intra-op spinning off (`session.intra_op.allow_spinning = "0"`): with it
on, the idle sessions' spinning threads steal the cores from the one being timed and scramble
the ratios (a dense CNN read 25.4 ms instead of 6.4 ms on a 2-core machine, see DESIGN.md).
Graph optimisation stays at ONNX Runtime's default (ORT_ENABLE_ALL), as deployed.

Params are the module's parameter count or, for an .onnx file, the elements of its
initializers; MACs are FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode over one forward
of a module (None for .onnx files).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import onnxruntime as ort
import torch
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from passes.errors import InputError
from passes.export import Inputs, OnnxFile, as_input_tuple, evaluating, export_onnx

ModelOrPath = Union[nn.Module, str, os.PathLike]


@dataclass(frozen=True)
class BenchRow:
    """One model's latency (ms over the timed runs) and size; ratio_to_first > 1 means faster."""

    name: str
    path: str | None  # None for a module (its export was temporary)
    p50_ms: float
    p90_ms: float
    mean_ms: float
    ratio_to_first: float  # p50 of the first row / p50 of this row
    file_bytes: int
    params: int
    macs: int | None


@dataclass(frozen=True)
class Machine:
    platform: str
    processor: str
    cpu_count: int | None
    onnxruntime: str
    provider: str
    threads: int
    runs: int
    warmup: int


_COLUMNS: list[tuple[str, Callable[[BenchRow], str]]] = [
    ("model", lambda r: r.name),
    ("p50 ms", lambda r: f"{r.p50_ms:.3f}"),
    ("p90 ms", lambda r: f"{r.p90_ms:.3f}"),
    ("mean ms", lambda r: f"{r.mean_ms:.3f}"),
    ("speedup", lambda r: f"{r.ratio_to_first:.2f}x"),
    ("MB", lambda r: f"{r.file_bytes / 1e6:.2f}"),
    ("params", lambda r: f"{r.params:,}"),
    ("MMACs", lambda r: "-" if r.macs is None else f"{r.macs / 1e6:.1f}"),
]


@dataclass(frozen=True)
class BenchReport:
    rows: list[BenchRow]
    machine: Machine

    def to_dict(self) -> dict[str, object]:
        return {"machine": asdict(self.machine), "rows": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(h for h, _ in _COLUMNS) + " |",
                 "|" + "|".join(" --- " for _ in _COLUMNS) + "|"]
        lines += ["| " + " | ".join(f(r) for _, f in _COLUMNS) + " |" for r in self.rows]
        return "\n".join(lines)

    def rich_table(self) -> Table:
        m = self.machine
        table = Table(title=f"ONNX Runtime {m.onnxruntime}, {m.provider}, {m.threads} threads, "
                            f"{m.runs} runs (interleaved) after {m.warmup} warmup")
        for header, _ in _COLUMNS:
            table.add_column(header, justify="left" if header == "model" else "right")
        for row in self.rows:
            table.add_row(*(f(row) for _, f in _COLUMNS))
        return table


@dataclass(frozen=True)
class _Candidate:
    name: str
    path: str | None
    file: Path
    info: OnnxFile
    params: int
    macs: int | None


def benchmark(models_or_onnx_paths: Sequence[ModelOrPath], inputs: Inputs, *,
              threads: int | None = None, warmup: int = 10, runs: int = 50,
              provider: str = "CPUExecutionProvider",
              names: Sequence[str] | None = None) -> BenchReport:
    """Time every model on `inputs` in one process, interleaved; the first row is the baseline."""
    items = list(models_or_onnx_paths)
    threads = (os.cpu_count() or 1) if threads is None else threads
    _validate(items, names, threads, warmup, runs, provider)
    tensors = as_input_tuple(inputs)
    labels = list(names) if names is not None else _default_names(items)
    with tempfile.TemporaryDirectory(prefix="passes-bench-") as tmp:
        candidates = [_candidate(item, label, tensors, Path(tmp) / f"model{i}.onnx")
                      for i, (item, label) in enumerate(zip(items, labels))]
        sessions = [_session(c.file, threads, provider) for c in candidates]
    feeds = [_feed(s, c.name, tensors) for s, c in zip(sessions, candidates)]
    times = _time(sessions, feeds, warmup, runs)
    first_p50 = float(np.percentile(times[0], 50))
    rows = [_row(c, t, first_p50) for c, t in zip(candidates, times)]
    machine = Machine(platform.platform(), platform.processor(), os.cpu_count(),
                      ort.__version__, provider, threads, runs, warmup)
    return BenchReport(rows, machine)


def _validate(items: list[ModelOrPath], names: Sequence[str] | None, threads: int,
              warmup: int, runs: int, provider: str) -> None:
    if not items:
        raise InputError("benchmark: no models given")
    for item in items:
        if not isinstance(item, nn.Module) and not Path(item).is_file():
            raise InputError(f"benchmark: no ONNX file at {os.fspath(item)!r}")
    if names is not None and len(names) != len(items):
        raise InputError(f"benchmark: {len(names)} names for {len(items)} models")
    if runs < 1 or warmup < 0 or threads < 1:
        raise InputError(f"benchmark: need runs >= 1, warmup >= 0, threads >= 1; "
                         f"got runs={runs}, warmup={warmup}, threads={threads}")
    if provider not in ort.get_available_providers():
        raise InputError(f"benchmark: provider {provider!r} not available; "
                         f"available: {ort.get_available_providers()}")


def _default_names(items: list[ModelOrPath]) -> list[str]:
    """File stem or class name; repeated names get their position appended."""
    base = [type(i).__name__ if isinstance(i, nn.Module) else Path(i).stem for i in items]
    return [f"{n} ({k})" if base.count(n) > 1 else n for k, n in enumerate(base)]


def _candidate(item: ModelOrPath, name: str, inputs: tuple[torch.Tensor, ...],
               scratch: Path) -> _Candidate:
    if isinstance(item, nn.Module):
        export_onnx(item, inputs, scratch)
        params = sum(p.numel() for p in item.parameters())
        return _Candidate(name, None, scratch, OnnxFile.read(scratch), params, _macs(item, inputs))
    info = OnnxFile.read(Path(item))
    return _Candidate(name, os.fspath(item), Path(item), info, info.params, None)


def _macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with evaluating(model), torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def _session(file: Path, threads: int, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(file, options, providers=[provider])


def _feed(session: ort.InferenceSession, name: str,
          inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Inputs by position: an .onnx file from elsewhere may name its inputs anything."""
    declared = session.get_inputs()
    if len(declared) != len(inputs):
        raise InputError(f"benchmark: {name} takes {len(declared)} inputs, {len(inputs)} given")
    return {d.name: t.detach().cpu().numpy() for d, t in zip(declared, inputs)}


def _time(sessions: list[ort.InferenceSession], feeds: list[dict[str, np.ndarray]],
          warmup: int, runs: int) -> list[list[float]]:
    """Milliseconds per call: warmup each, then `runs` rounds of one call per session."""
    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(runs):
        for k in range(n):  # round r starts at model r mod n: every model takes every position
            i = (r + k) % n
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - start) * 1e3)
    return times


def _row(c: _Candidate, times_ms: list[float], first_p50: float) -> BenchRow:
    p50, p90 = (float(v) for v in np.percentile(times_ms, [50, 90]))
    return BenchRow(c.name, c.path, p50, p90, float(np.mean(times_ms)), first_p50 / p50,
                    c.info.file_bytes, c.params, c.macs)

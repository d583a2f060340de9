"""Analysis + rewrite time: passes vs Torch-Pruning, same models, same settings, one process.

Both tools prune a fresh copy of the model in place (the copy is made outside the timer, as
the last copy before it: until 2026-11-24 passes' copy was followed by the copy its `analyze`
timing uses, which pushed the copy's last tensors out of the cache before passes read them) at
ratio 0.5, local L2 ranking, with the final classifier ignored; runs are interleaved
(passes, TP, passes, TP, ...). Reported: each tool's median time, and the ratio TP / passes
as the median over the interleaved pairs (each TP run against the passes run just before it:
the machine is shared, and its speed drifts over minutes more than between neighbours), with
the smallest and largest pair. Before each timed run the garbage of the previous one is
collected (`gc.collect()`, outside the timer): otherwise a tool paid, at random, for a
collection of the other tool's leftover cycles (measured: one of three passes runs on vit_b_16
took 263 ms instead of 57 ms to trace).

Returning the original weights' memory is outside both timers: during each run the benchmark
holds the copy's original parameters and buffers. Torch-Pruning keeps them referenced anyway
(measured: every parameter `step()` replaced, 160 of resnet50's 161, 603 of densenet201's 604,
151 of vit_b_16's 152, is still alive when it returns, until the pruner is garbage collected,
after its timer), while passes drops them as soon as the rewrite is done: without the
benchmark's references passes alone paid for freeing them. What that release costs passes is
measured after its timer and shown (ad hoc on resnet50, about 100 MB: 10 ms the first time,
under half a millisecond once the allocator reuses its memory, as in these repeated runs).

passes: `prune(..., verify=False, inplace=True)` = trace + shapes + MACs, channel analysis,
importance, plan, rewrite + shape check of every node, report (params/MACs before and after).
Also shown: `analyze` alone (trace + shapes + channel analysis), and where passes' prune time
goes (median per stage, timed by wrapping passes' own stage functions in the same runs).
Torch-Pruning: `MagnitudePruner(...)` (dependency graph) + `step()` (importance + pruning).

Each model gets `--repeats` pairs (15), fewer when its pairs pass `--budget` seconds (300; at
least 3 pairs): a densenet201 Torch-Pruning run takes about 50 s here. The pair ratios of one
model spread widely on this shared machine (resnet50, 7 pairs: 3.1-6.3x), so the median needs
more pairs than the 7 of the runs before 2026-11-23.

    python benchmarks/speed.py [--models resnet50 densenet201 vit_b_16] [--repeats 15] [--budget 300] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import passes
from passes.report import code_version, cpu_model
from passes.channels import analyze_graph
from passes.trace import trace

RESULTS = Path(__file__).parent / "results"


def classifier(model):
    for attr in ("fc", "classifier", "heads"):
        m = getattr(model, attr, None)
        if m is not None:
            return m[-1] if isinstance(m, torch.nn.Sequential) else m
    raise ValueError("no classifier found")


def time_tp(model, x):
    import torch_pruning as tp

    m = copy.deepcopy(model)
    held = _originals(m)  # see the module docstring
    gc.collect()
    t = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=0.5, global_pruning=False, ignored_layers=[classifier(m)])
    built = time.perf_counter() - t
    pruner.step()
    total = time.perf_counter() - t
    del held  # the pruner still references them: their memory is returned when it is collected
    return total, built


# (stage, module, function): wrapped with a timer; "other" is the rest of prune's time
STAGES = [("input checks", "passes.api", "check_model"), ("trace + shapes + MACs", "passes.api", "trace"),
          ("channel analysis", "passes.api", "analyze_graph"), ("importance", "passes.importance", "scores"),
          ("selection", "passes.api", "select"), ("selection", "passes.api", "keep_every_dim"),
          ("weight slicing", "passes.rewrite", "slice_tensors"), ("shape check + MACs after", "passes.rewrite", "check_shapes")]
_spent: dict[str, float] = {}


def _instrument():
    import functools
    import importlib

    for stage, mod, fn in STAGES:
        module = importlib.import_module(mod)
        f = getattr(module, fn)

        @functools.wraps(f)
        def timed(*a, _f=f, _stage=stage, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                _spent[_stage] = _spent.get(_stage, 0.0) + time.perf_counter() - t
        setattr(module, fn, timed)


def _originals(m):
    """The model's parameters and buffers: held by the benchmark during a run."""
    return [*m.parameters(), *m.buffers()]


def time_passes(model, x):
    fresh, m = copy.deepcopy(model), copy.deepcopy(model)  # the timed copy last, as time_tp's
    held = _originals(m)
    _spent.clear()
    gc.collect()
    t = time.perf_counter()
    passes.prune(m, x, ratio=0.5, importance="l2", verify=False, inplace=True, ignored_layers=[classifier(m)])
    total = time.perf_counter() - t
    stages = dict(_spent)
    stages["other (report, plan record, rule fixes, code generation)"] = total - sum(stages.values())
    t = time.perf_counter()
    del held  # the last references to the original weights: their memory is returned here
    release = time.perf_counter() - t
    gc.collect()
    t = time.perf_counter()
    analyze_graph(trace(fresh, x))
    return total, time.perf_counter() - t, stages, release



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "densenet201", "vit_b_16"])
    ap.add_argument("--repeats", type=int, default=15, help="pairs per model (at most)")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds per model: no new pair once its pairs took this long (at least 3 pairs)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    _instrument()
    rows = []
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        time_passes(model, x), time_tp(model, x)  # warm-up both (imports, allocator)
        p_tot, p_an, t_tot, t_build, p_stages, p_rel = [], [], [], [], [], []
        start = time.perf_counter()
        for i in range(args.repeats):
            if i >= 3 and time.perf_counter() - start > args.budget:
                break
            a, b, st, rel = time_passes(model, x)
            p_tot.append(a), p_an.append(b), p_stages.append(st), p_rel.append(rel)
            a, b = time_tp(model, x)
            t_tot.append(a), t_build.append(b)
        row = dict(model=name, pairs=len(p_tot), passes_prune_s=statistics.median(p_tot),
                   passes_analyze_s=statistics.median(p_an), tp_total_s=statistics.median(t_tot),
                   tp_graph_s=statistics.median(t_build), passes_release_s=statistics.median(p_rel))
        pairs = [t / p for p, t in zip(p_tot, t_tot)]  # each TP run against the passes run just before it
        row["speedup"] = statistics.median(pairs)
        row["speedup_min_max"] = (min(pairs), max(pairs))
        row["speedup_quartiles"] = tuple(statistics.quantiles(pairs, n=4)[::2])  # first and third
        row["runs_s"] = dict(passes=p_tot, tp=t_tot)
        row["passes_stages_s"] = {k: statistics.median(st[k] for st in p_stages) for k in p_stages[0]}
        rows.append(row)
        print(f"{name}: passes {row['passes_prune_s']:.3f}s (analyze {row['passes_analyze_s']:.3f}s) | "
              f"Torch-Pruning {row['tp_total_s']:.3f}s (graph {row['tp_graph_s']:.3f}s) | "
              f"TP/passes {row['speedup']:.2f}x (pairs {row['speedup_min_max'][0]:.2f}-{row['speedup_min_max'][1]:.2f}x)",
              flush=True)
        write(rows, args, argv)  # after every model: an interrupted run keeps what it measured


def write(rows, args, argv):
    import torch_pruning as tp

    machine = dict(code=code_version(), cpu=cpu_model(), cores=torch.get_num_threads(), load_average_1_5_15=os.getloadavg(),
                   python=platform.python_version(),
                   torch=torch.__version__, torchvision=torchvision.__version__, torch_pruning=tp.__version__)
    command = " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(dict(command=command, machine=machine, size=args.size, repeats=args.repeats,
                                                        budget_s=args.budget, rows=rows), indent=1))
    lines = ["# Analysis + rewrite time: passes vs Torch-Pruning", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Input 1x3x{args.size}x{args.size}, ratio 0.5, local L2, classifier ignored, up to {args.repeats} "
             f"interleaved pairs of runs per model (fewer once a model's pairs took {args.budget:.0f} s), both "
             "in place on a fresh copy, garbage collected before each run; the copy's original weights are "
             "held by the benchmark during each run, so freeing them is in neither time (Torch-Pruning keeps "
             "them referenced until its pruner is collected; passes drops them at the end of the rewrite: the "
             "last column is what that release took after passes' run). "
             "Times are medians; TP / passes is the median of the per-pair ratios (a TP run over the passes "
             "run just before it), then the first and third quartiles and the smallest and largest pair. The "
             "load average is the machine's at the end of the run; the machine is shared, so ratios from "
             "different runs differ.", "",
             "| model | passes prune (s) | passes analyze (s) | Torch-Pruning graph+step (s) | TP graph (s) "
             "| pairs | TP / passes | pairs q1-q3 | pairs min-max | passes: release of the original weights (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (lo, hi), (q1, q3) = r["speedup_min_max"], r["speedup_quartiles"]
        lines.append(f"| {r['model']} | {r['passes_prune_s']:.3f} | {r['passes_analyze_s']:.3f} | {r['tp_total_s']:.3f} "
                     f"| {r['tp_graph_s']:.3f} | {r['pairs']} | {r['speedup']:.2f}x | {q1:.2f}-{q3:.2f}x "
                     f"| {lo:.2f}-{hi:.2f}x | {r['passes_release_s'] * 1000:.1f} |")
    stages = list(rows[0]["passes_stages_s"]) if rows else []
    lines += ["", "Where passes' prune time goes (median ms per stage; stages that run twice are summed):", "",
              "| model | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['passes_stages_s'][k] * 1000:.0f}" for k in stages) + " |")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

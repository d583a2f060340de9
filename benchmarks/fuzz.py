"""Long fuzz runs: random architectures (tests/strategies.py) pruned with random options.

    python benchmarks/fuzz.py                      # 10,000 examples, seed 0, one process
    python benchmarks/fuzz.py --examples 500 --workers 2
    python benchmarks/fuzz.py --replay 17          # one example, full traceback
    python benchmarks/fuzz.py --engine hypothesis  # draw through hypothesis instead (seeded)

Each example is one program + one set of prune options, drawn by the same generator the pytest
fuzz test uses (`strategies.gen_program` / `gen_options`). With the default `random` engine
example i of seed S is drawn from `random.Random(S * 1_000_000 + i)`: independent draws, and any
example can be replayed from its number alone. The `hypothesis` engine runs the hypothesis
strategy itself (`@seed(S)`, generate phase only), whose mutations give more near-duplicates.

Every example must satisfy `strategies.check` (prune runs, output shapes kept, verify ok, exact
equivalence within 1e-4, normalisations included, and the plan saved to JSON
re-applies to a fresh instance of the program with the same widths). Measured here: about
0.15 CPU-s per example, so 10,000 examples are ~25 CPU-minutes (`--workers 2` on an idle
2-core machine: ~13 minutes). Failures are grouped by
signature (exception type + normalised first line, or "not equivalent"); for each the report
keeps the count, the innermost `passes/` frame, the block kinds every failing program shares,
and the smallest failing program. Results go to benchmarks/results/fuzz.md and fuzz.json.
"""

from __future__ import annotations

import argparse
import signal
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

STRIDE = 1_000_000  # example seed = seed * STRIDE + index


def example_seed(seed: int, index: int) -> int:
    return seed * STRIDE + index


def signature(e: BaseException) -> str:
    """Exception type + first line, with names and numbers normalised so one bug is one signature."""
    import passes

    if isinstance(e, passes.VerificationError) and "FAILS" in str(e):
        return "VerificationError: not equivalent"
    first = (str(e).strip().splitlines() or [""])[0]
    first = first.split(" with meta=")[0]
    m = re.search(r"ShapeProp error for: node=%\w+ : \[[^\]]*\] = (\w+)\[target=([^\]]+)\]", first)
    if m:  # keep the op, drop the node's arguments
        first = first[:m.start()] + f"ShapeProp error at {m.group(1)}[target={m.group(2)}]"
    first = re.sub(r"node '[^']*'", "node '…'", first)
    first = re.sub(r"%\w+", "%x", first)
    first = re.sub(r"\d+", "N", first)
    first = re.sub(r"\[(N, )*N\]", "[…]", first)
    first = re.sub(r"\((N, )*N\)", "(…)", first)
    return f"{type(e).__name__}: {first[:160]}"


def where(e: BaseException) -> str:
    """Innermost frame inside passes/ (file:line function), the likely culprit."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/passes/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split('/passes/')[-1]}:{f.lineno} {f.name}"


def run_one(args) -> dict:
    """Draw, build, prune and check one example; never raises."""
    engine_seed, spec, opts = args
    import strategies as S

    out = dict(seed=engine_seed, spec=spec, options=opts, ok=False)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        model, inputs = S.build(spec)
        S.outputs(model, inputs)
    except Exception as e:  # the generator drew a model that does not run: a test bug, not a core bug
        out.update(signature=f"GENERATOR {signature(e)}", message=str(e)[:500], where="")
        return out
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch's ShapeProp prints tracebacks
            r, again = S.check(model, inputs, opts, spec)
        v = r.report.verify
        out.update(ok=True, exact=bool(v.exact), removed=int(r.report.units_removed), units=int(r.report.units),
                   params=(r.report.params_before, r.report.params_after),
                   float64=sum(x is not None and x.report.verify.precision == "float64" for x in (r, again)))
    except Exception as e:
        out.update(signature=signature(e), message=(str(e).strip().splitlines() or [""])[0][:500],
                   where=where(e), exc=type(e).__name__)
    out["time"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0
    return out


def draw_random(seed: int, index: int, max_blocks: int = 6):
    import strategies as S
    s = example_seed(seed, index)
    spec, opts = S.random_example(s, max_blocks)
    return s, spec, opts


def _worker_init(threads: int):
    import torch
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def _random_task(arg):
    return run_one(draw_random(*arg))


def run_random(n: int, seed: int, workers: int, threads: int, max_blocks: int):
    tasks = [(seed, i, max_blocks) for i in range(n)]
    if workers <= 1:
        _worker_init(threads)
        for t in tasks:
            yield _random_task(t)
    else:
        with mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
            yield from pool.imap_unordered(_random_task, tasks, chunksize=8)


def run_hypothesis(n: int, seed: int, workers: int, threads: int, max_blocks: int):
    """Hypothesis engine, one process (workers > 1: one hypothesis run per worker, seeds seed+k)."""
    if workers > 1:
        per = [n // workers + (k < n % workers) for k in range(workers)]
        with mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
            for chunk in pool.starmap(_hypothesis_chunk, [(per[k], seed + k, max_blocks) for k in range(workers)]):
                yield from chunk
        return
    _worker_init(threads)
    yield from _hypothesis_chunk(n, seed, max_blocks)


def _hypothesis_chunk(n: int, seed: int, max_blocks: int) -> list:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hseed
    import strategies as S

    results = []

    @hseed(seed)
    @settings(max_examples=n, derandomize=False, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(spec=S.programs(max_blocks), data=st.data())
    def body(spec, data):
        model, _ = S.build(spec)
        opts = data.draw(S.prune_options(model))
        results.append(run_one((f"hypothesis:{seed}:{len(results)}", spec, opts)))

    body()
    return results


def machine() -> dict:
    import torch

    from passes.report import code_version, cpu_model

    return dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu=cpu_model(), cpus=os.cpu_count(), loadavg_at_start=list(os.getloadavg()), code=code_version())


def summarise(results: list, meta: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    groups = defaultdict(list)
    for r in bad:
        groups[r["signature"]].append(r)
    per_kind = defaultdict(Counter)
    for r in results:
        for k in {b[0] for b in r["spec"]["blocks"]}:
            per_kind[k]["ok" if r["ok"] else "fail"] += 1
    sigs = []
    import strategies as S
    for sig, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        kinds = set.intersection(*({b[0] for b in r["spec"]["blocks"]} for r in rs))
        smallest = min(rs, key=lambda r: (S.spec_size(r["spec"]), len(json.dumps(r["spec"]))))
        sigs.append(dict(signature=sig, count=len(rs), where=Counter(r["where"] for r in rs).most_common(3),
                         kinds_in_every_failure=sorted(kinds), example_message=smallest["message"],
                         seeds=[r["seed"] for r in rs[:20]], smallest=dict(seed=smallest["seed"], spec=smallest["spec"],
                                                                            options=smallest["options"])))
    times = sorted(r.get("time", 0.0) for r in results)
    return dict(
        meta, examples=len(results), passed=len(ok), failed=len(bad),
        exact=sum(r.get("exact", False) for r in ok), inexact=sum(not r.get("exact", True) for r in ok),
        pruned_something=sum(r.get("removed", 0) > 0 for r in ok),
        float64_rechecks=sum(r.get("float64", 0) > 0 for r in ok),
        rate_examples_per_s=len(results) / meta["wall_time_s"] if meta["wall_time_s"] else None,
        example_time_s=dict(median=times[len(times) // 2] if times else None, max=times[-1] if times else None),
        cpu_s_per_example=sum(r.get("cpu", 0.0) for r in results) / max(len(results), 1),
        per_kind={k: dict(v) for k, v in sorted(per_kind.items())},
        signatures=sigs,
        failures=[{k: r[k] for k in ("seed", "signature", "message", "where", "spec", "options")} for r in bad[:500]],
    )


def write_reports(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fuzz.json").write_text(json.dumps(summary, indent=1, default=str))
    m = summary["machine"]
    lines = [
        "# Fuzz run: random architectures through passes.prune", "",
        f"Command: `{summary['command']}`", "",
        f"Machine: {m['cpu']} ({m['cpus']} cpus, load average at start {m['loadavg_at_start'][0]:.2f}), "
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}.", "",
        f"Code: {m['code']}.", "",
        f"Engine `{summary['engine']}`, seed {summary['seed']}, {summary['workers']} worker(s), "
        f"{summary['threads']} torch thread(s) each, at most {summary['max_blocks']} blocks per program.", "",
        *([f"**Stopped early:** {summary['stopped_after']}.", ""] if summary.get("stopped_after") else []),
        "| examples | passed | failed | exact | inexact | pruned something | wall time | examples/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {summary['examples']} | {summary['passed']} | {summary['failed']} | {summary['exact']} | "
        f"{summary['inexact']} | {summary['pruned_something']} | {summary['wall_time_s']:.1f} s | "
        f"{summary['rate_examples_per_s']:.2f} |", "",
        f"Examples whose equivalence held only in float64 (float32 rounding over tolerance, see passes.verify; "
        f"the first prune or the plan re-applied): {summary.get('float64_rechecks', 0)}.", "",
        f"Per example: median {summary['example_time_s']['median']:.3f} s, max {summary['example_time_s']['max']:.3f} s "
        f"wall; {summary['cpu_s_per_example']:.3f} CPU-s on average (load-independent: "
        f"10,000 examples = {summary['cpu_s_per_example'] * 10000 / 60:.0f} CPU-minutes).",
        "",
    ]
    if not summary["signatures"]:
        lines += ["No failures.", ""]
    else:
        lines += ["## Failure signatures", "",
                  "| count | signature | innermost passes/ frame | block kinds in every failure |",
                  "| ---: | --- | --- | --- |"]
        for s in summary["signatures"]:
            w = s["where"][0][0] if s["where"] else ""
            sig = s["signature"].replace("|", "\\|")
            lines.append(f"| {s['count']} | `{sig}` | `{w}` | {', '.join(s['kinds_in_every_failure'])} |")
        lines.append("")
        for i, s in enumerate(summary["signatures"], 1):
            sm = s["smallest"]
            replay = (f"python benchmarks/fuzz.py --replay {sm['seed']}" if isinstance(sm["seed"], int)
                      else "(hypothesis engine: build the spec below)")
            lines += [f"### {i}. `{s['signature']}` ({s['count']})", "",
                      f"Message: `{s['example_message'][:300]}`", "",
                      f"Smallest failing program (example {sm['seed']}; `{replay}`):", "",
                      "```python", f"spec = {sm['spec']!r}", f"options = {sm['options']!r}",
                      "model, inputs = strategies.build(spec); strategies.check(model, inputs, options)", "```", ""]
    lines += ["## Pass/fail per block kind", "", "| kind | ok | fail |", "| --- | ---: | ---: |"]
    for k, v in summary["per_kind"].items():
        lines.append(f"| {k} | {v.get('ok', 0)} | {v.get('fail', 0)} |")
    (out_dir / "fuzz.md").write_text("\n".join(lines) + "\n")


def replay(example: int, threads: int, max_blocks: int) -> int:
    """Run one example of the random engine in the foreground with the full traceback."""
    import strategies as S
    import torch
    torch.set_num_threads(threads)
    spec, opts = S.random_example(example, max_blocks)
    print("spec =", repr(spec))
    print("options =", repr(opts))
    model, inputs = S.build(spec)
    r, again = S.check(model, inputs, opts, spec)
    print("ok:", r.report.summary(), "|", r.report.verify.message, "| re-applied:", again.report.verify.message)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (the machine has 2 shared cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest for tiny models)")
    ap.add_argument("--engine", choices=["random", "hypothesis"], default="random")
    ap.add_argument("--max-blocks", type=int, default=6)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--progress", type=int, default=250, help="print a progress line every N examples")
    ap.add_argument("--replay", type=int, default=None, metavar="EXAMPLE_SEED",
                    help="run one example (its seed as printed in the report) with the full traceback")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.replay is not None:
        return replay(a.replay, a.threads, a.max_blocks)
    meta = dict(command=" ".join(["python", "benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
                engine=a.engine, seed=a.seed, workers=a.workers, threads=a.threads, max_blocks=a.max_blocks,
                machine=machine())
    run = run_random if a.engine == "random" else run_hypothesis
    results, fails = [], Counter()
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    try:
        for r in run(a.examples, a.seed, a.workers, a.threads, a.max_blocks):
            results.append(r)
            if not r["ok"]:
                fails[r["signature"]] += 1
            if a.progress and len(results) % a.progress == 0:
                el = time.perf_counter() - t0
                print(f"[{len(results)}/{a.examples}] {el:.0f} s, {len(results) / el:.2f} ex/s, "
                      f"{sum(fails.values())} failures in {len(fails)} signatures", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # a stopped run still reports what it ran, and says it stopped
        meta["stopped_after"] = f"{len(results)} of {a.examples} requested examples (interrupted)"
    meta["wall_time_s"] = time.perf_counter() - t0
    summary = summarise(results, meta)
    write_reports(summary, a.out)
    print(f"{summary['examples']} examples, {summary['failed']} failed, {len(summary['signatures'])} signatures, "
          f"{meta['wall_time_s']:.1f} s ({summary['rate_examples_per_s']:.2f} examples/s) -> {a.out / 'fuzz.md'}")
    for s in summary["signatures"]:
        print(f"  {s['count']:5d}  {s['signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `passes prune` report: one dict (report.json), its markdown (report.md) and rich table.

`build_report(...)` gathers what one run measured: params and MACs before/after (from the
prune report), ONNX file sizes and ORT parity errors of both exports, ORT p50 latency of both
(interleaved, `passes.bench`), latency speedup, MAC reduction and their ratio (speedup / MAC
reduction; 1.0 means latency fell exactly as much as MACs did), the masked-equivalence
verdict, per-layer widths, pinned channels with reasons, the command and the machine.
Ratios are original / pruned, so > 1 means smaller or faster. For a run with `--part`, all of
these are the part's (its ONNX files are exported on the tensors the whole model hands it);
`part` and `part_input_shapes` say which part and on what.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from rich.table import Table

FORMAT = "passes.report/1"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """The git commit of this checkout, plus the files under passes/ that differ from it (a
    benchmark may run mid-change); "unknown" outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "passes"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [f for f in dirty if f.startswith("passes/")]
    return (head or "unknown") + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def machine_info() -> dict:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or not b else a / b


def build_report(*, model: str, spec: str, input_shapes: list, settings: dict, command: str,
                 result, exports: dict, bench=None, timings: dict | None = None,
                 part_input_shapes: list | None = None) -> dict:
    """`result`: PruneResult; `exports`: {"original": ExportResult, "pruned": ExportResult};
    `bench`: BenchReport with rows (original, pruned) or None. For a result of `part=`, the
    counts, files and latencies are the part's, and `part_input_shapes` are the shapes of the
    tensors it receives."""
    rep = result.report
    ver = rep.verify
    p50 = (bench.rows[0].p50_ms, bench.rows[1].p50_ms) if bench else (None, None)
    speedup = _ratio(*p50)
    mac_reduction = _ratio(rep.macs_before, rep.macs_after)
    return {
        "format": FORMAT,
        "model": model, "spec": spec, "input_shapes": [list(s) for s in input_shapes],
        "part": getattr(result, "part", None),
        "part_input_shapes": None if part_input_shapes is None else [list(s) for s in part_input_shapes],
        "command": command, "settings": settings,
        "params_before": rep.params_before, "params_after": rep.params_after,
        "param_reduction": _ratio(rep.params_before, rep.params_after),
        "macs_before": rep.macs_before, "macs_after": rep.macs_after, "mac_reduction": mac_reduction,
        "onnx_bytes_before": exports["original"].file_bytes,
        "onnx_bytes_after": exports["pruned"].file_bytes,
        "ort_p50_ms_before": p50[0], "ort_p50_ms_after": p50[1],
        "latency_speedup": speedup,
        "speedup_over_mac_reduction": _ratio(speedup, mac_reduction),
        "bench": None if bench is None else {
            "runs": bench.machine.runs, "warmup": bench.machine.warmup,
            "threads": bench.machine.threads, "provider": bench.machine.provider,
            "rows": bench.to_dict()["rows"]},
        "parity": {k: {"max_abs_error": e.max_abs_error, "max_rel_error": e.max_rel_error,
                       "exporter": e.exporter, "opset": e.opset} for k, e in exports.items()},
        "verdict": _verdict(ver),
        "verify": ver.to_dict() if ver else None,
        "units": rep.units, "units_removed": rep.units_removed,
        "layers": [{"name": l.name, "kind": l.kind, "before": list(l.before), "after": list(l.after)}
                   for l in rep.layers],
        "pinned": [{"reason": p.reason, "node": p.node, "channels": p.channels} for p in rep.pinned],
        "timings_s": timings or {},
        "machine": machine_info(),
    }


def _verdict(ver) -> str:
    if ver is None:
        return "not verified"
    if not ver.ok:
        return "failed"
    return "masked-equivalent" if ver.exact else "shapes-only (masked equivalence does not apply)"


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def metric_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(metric, original, pruned, ratio original/pruned) for the summary tables."""
    ms = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    mb = lambda v: f"{v / 1e6:.2f}"  # noqa: E731
    rows = [
        ("params", _n(r["params_before"]), _n(r["params_after"]), _x(r["param_reduction"])),
        ("MACs", _n(r["macs_before"]), _n(r["macs_after"]), _x(r["mac_reduction"])),
        ("ONNX MB", mb(r["onnx_bytes_before"]), mb(r["onnx_bytes_after"]),
         _x(_ratio(r["onnx_bytes_before"], r["onnx_bytes_after"]))),
        ("ORT p50 ms", ms(r["ort_p50_ms_before"]), ms(r["ort_p50_ms_after"]), _x(r["latency_speedup"])),
        ("ORT parity max abs err", f"{r['parity']['original']['max_abs_error']:.2e}",
         f"{r['parity']['pruned']['max_abs_error']:.2e}", ""),
    ]
    return rows


def rich_table(r: dict) -> Table:
    table = Table(title=f"{_subject(r)} pruned: {r['verdict']}")
    for h in ("metric", "original", "pruned", "ratio"):
        table.add_column(h, justify="left" if h == "metric" else "right")
    for row in metric_rows(r):
        table.add_row(*row)
    s = r["speedup_over_mac_reduction"]
    table.caption = ("speedup / MAC reduction: " + ("- (--no-bench)" if s is None else f"{s:.2f}")
                     + " (1.0 = latency fell as much as MACs)")
    return table


def _subject(r: dict) -> str:
    """The model's name, or its part's: "resnet18", "fasterrcnn_resnet50_fpn part 'backbone'"."""
    return r["model"] + (f" part {r['part']!r}" if r.get("part") else "")


def _shapes(shapes: list) -> str:
    return "; ".join(",".join(map(str, x)) for x in shapes)


def to_markdown(r: dict) -> str:
    v = r["verify"] or {}
    m = r["machine"]
    s = r["speedup_over_mac_reduction"]
    part = r.get("part")
    lines = [f"# passes prune: {_subject(r)}", "",
             "```", r["command"], "```", "",
             f"Input shape(s): {_shapes(r['input_shapes'])}. "
             f"Settings: " + ", ".join(f"{k}={val}" for k, val in r["settings"].items()) + ".", "",
             *([f"Only the submodule `{part}` was pruned, on the tensors the whole model hands it "
                f"({_shapes(r['part_input_shapes'] or [])}); the whole model ran with the pruned part. "
                f"Params, MACs, ONNX files and latencies below are the part's.", ""] if part else []),
             "| metric | original | pruned | ratio |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in metric_rows(r)]
    lines += ["", f"Speedup / MAC reduction: {'-' if s is None else f'{s:.2f}'} "
                  "(1.0 = latency fell exactly as much as MACs)."]
    if r["bench"]:
        b = r["bench"]
        lines.append(f"ORT latency: {b['provider']}, {b['threads']} threads, {b['runs']} interleaved "
                     f"runs after {b['warmup']} warmup, intra-op spinning off.")
    lines += ["", "## Checks", "",
              f"- Equivalence verdict: **{r['verdict']}**; {v.get('message', '')}",
              *(f"- ONNX Runtime parity, {k}.onnx: max abs error {p['max_abs_error']:.3g}, "
                f"max rel error {p['max_rel_error']:.3g} ({p['exporter']} exporter, opset {p['opset']})"
                for k, p in r["parity"].items()),
              f"- Pruning units removed: {r['units_removed']} of {r['units']}",
              "", "## Machine", "",
              f"{m['cpu']}, {m['cpu_count']} cores; {m['platform']}; python {m['python']}, torch "
              f"{m['torch']}, torchvision {m['torchvision']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}.",
              "", "## Pinned channels", "", "| channels | node | reason |", "| ---: | --- | --- |"]
    lines += [f"| {p['channels']} | {p['node']} | {p['reason'].replace('|', '/')} |" for p in r["pinned"]]
    lines += ["", "## Layer widths (weight shapes)", "", "| layer | kind | before | after |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {l['name']} | {l['kind']} | {tuple(l['before'])} | {tuple(l['after'])} |" for l in r["layers"]]
    if r["timings_s"]:
        lines += ["", "## Step times", "", ", ".join(f"{k} {t:.1f} s" for k, t in r["timings_s"].items())]
    return "\n".join(lines) + "\n"

"""ONNX Runtime latency of pruned torchvision models vs. the originals, on this machine.

For each model (weights=None, input 1x3x224x224, seed 0): `passes.prune` at ratio 0.5 (local,
L2, round_to=8; resnet18 also with round_to=None, and both at ratio 0.3, where unrounded widths
are not multiples of 8), export of the original and every pruned variant with
`passes.export_onnx` (ORT parity checked), then per variant one `passes.benchmark` call that
times [original, pruned] interleaved in this process (intra-op spinning off). Writes benchmarks/results/ort.md and ort.json: params and MACs
before/after, MAC reduction, ORT p50 before/after, latency speedup, and speedup / MAC reduction
(1.0 = latency fell exactly as much as MACs; it is the number that shows how deployable a
pruned shape is), plus the command line and the machine.

    python benchmarks/ort.py [--runs 100] [--warmup 10] [--models resnet18,vit_b_16] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import passes
from passes.report import machine_info

HERE = Path(__file__).resolve().parent
# model -> (ratio, round_to) variants. At ratio 0.5 resnet18's widths (64 * 2**k) halve to
# multiples of 8 anyway, so round_to=None changes nothing there; ratio 0.3 shows the difference.
MODELS = {"resnet18": [(0.5, 8), (0.5, None), (0.3, 8), (0.3, None)], "resnet50": [(0.5, 8)],
          "mobilenet_v2": [(0.5, 8)], "vit_b_16": [(0.5, 8)]}


def _widths(layers) -> dict:
    """Pruned layers: how many have an output width that is a multiple of 8, and examples."""
    changed = [l for l in layers if l.after != l.before and len(l.after) > 0]
    odd = sorted({l.after[0] for l in changed if l.after[0] % 8})
    return {"multiple_of_8": sum(1 for l in changed if l.after[0] % 8 == 0), "pruned_layers": len(changed),
            "other_widths": odd[:8]}


def _attention(result) -> list[dict]:
    """nn.MultiheadAttention layers: in_proj and out_proj weight shapes before/after."""
    return [{"name": l.name, "before": list(l.before), "after": list(l.after)}
            for l in result.report.layers
            if l.kind in ("MultiheadAttention", "SlimMultiheadAttention") or l.name.endswith("out_proj")]


def run_model(name: str, variants: list, runs: int, warmup: int, tmp: Path) -> tuple[list, list]:
    """Export the original once; per variant prune, export, and time [original, pruned]
    interleaved (pairs: with three sessions in one rotation the one right after the large
    original read up to 25% slower here, so every comparison gets its own pair)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    original = passes.export_onnx(model, x, tmp / f"{name}.onnx")
    rows, benches, seen, files = [], [], {}, {}
    for ratio, rt in variants:
        t = time.perf_counter()
        result = passes.prune(model, x, ratio=ratio, importance="l2", global_pruning=False, round_to=rt)
        prune_s = time.perf_counter() - t
        exported = passes.export_onnx(result.model, x, tmp / f"{name}-{ratio}-{rt}.onnx")
        label = f"pruned ratio={ratio} round_to={rt}"
        bench = passes.benchmark([original, exported], x, runs=runs, warmup=warmup, names=["original", label])
        benches.append(bench.to_dict())
        print(f"{name}:\n{bench.to_markdown()}", flush=True)
        base, row = bench.rows
        rep = result.report
        mac_reduction = rep.macs_before / rep.macs_after
        digest = hashlib.sha256(exported.path.read_bytes()).hexdigest()
        rows.append({
            "model": name, "ratio": ratio, "round_to": rt,
            "params_before": rep.params_before, "params_after": rep.params_after,
            "macs_before": rep.macs_before, "macs_after": rep.macs_after,
            "mac_reduction": mac_reduction,
            "ort_p50_ms_before": base.p50_ms, "ort_p50_ms_after": row.p50_ms,
            "ort_p90_ms_before": base.p90_ms, "ort_p90_ms_after": row.p90_ms,
            "latency_speedup": base.p50_ms / row.p50_ms,
            "speedup_over_mac_reduction": base.p50_ms / row.p50_ms / mac_reduction,
            "onnx_bytes_before": original.file_bytes, "onnx_bytes_after": exported.file_bytes,
            "same_onnx_as": seen.get(digest),
            "parity_max_rel_error": {"original": original.max_rel_error, "pruned": exported.max_rel_error},
            "verify": rep.verify.message if rep.verify else None,
            "widths": _widths(rep.layers),
            "attention": _attention(result),
            "prune_s": round(prune_s, 2),
        })
        seen.setdefault(digest, f"ratio={ratio} round_to={rt}")
        files[(ratio, rt)] = (exported, digest)
    for r in rows:  # rounded vs unrounded head to head, where they differ
        a, b = files.get((r["ratio"], 8)), files.get((r["ratio"], None))
        if r["round_to"] is None and a and b and a[1] != b[1]:
            bench = passes.benchmark([a[0], b[0]], x, runs=runs, warmup=warmup,
                                     names=["round_to=8", "round_to=None"])
            benches.append(bench.to_dict())
            print(f"{name} head to head:\n{bench.to_markdown()}", flush=True)
            r["head_to_head_p50_ms"] = {"round_to=8": bench.rows[0].p50_ms, "round_to=None": bench.rows[1].p50_ms}
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, benches


def notes(results: list) -> list[str]:
    """Observations computed from the results (round_to, ViT attention widths)."""
    out = []
    for r in results:
        if r["same_onnx_as"]:
            out.append(f"- {r['model']} ratio={r['ratio']} round_to={r['round_to']} gives the same ONNX file "
                       f"as {r['same_onnx_as']} (every pruned width is already a multiple of 8); its two "
                       f"rows differ only by measurement noise.")
    by = {(r["model"], r["ratio"], r["round_to"]): r for r in results}
    a, b = by.get(("resnet18", 0.3, 8)), by.get(("resnet18", 0.3, None))
    if a and b and b.get("head_to_head_p50_ms"):
        h = b["head_to_head_p50_ms"]
        out.append(f"- resnet18 at ratio 0.3: the unrounded widths {b['widths']['other_widths']} give "
                   f"speedup {b['latency_speedup']:.2f}x (speedup / MAC reduction "
                   f"{b['speedup_over_mac_reduction']:.2f}); rounded to multiples of 8, "
                   f"{a['latency_speedup']:.2f}x ({a['speedup_over_mac_reduction']:.2f}) with "
                   f"{a['macs_after'] / b['macs_after']:.2f}x the unrounded MACs. Timed head to head "
                   f"(one interleaved pair): rounded {h['round_to=8']:.2f} ms, unrounded "
                   f"{h['round_to=None']:.2f} ms.")
    def fmt(rows):
        return ", ".join(f"{r['model']} ratio={r['ratio']} round_to={r['round_to']}: "
                         f"{r['speedup_over_mac_reduction']:.2f}" for r in rows)

    high = [r for r in results if r["speedup_over_mac_reduction"] > 1.05 and not r["same_onnx_as"]]
    if high:
        out.append(f"- Speedup / MAC reduction above 1.0 ({fmt(high)}): latency fell more than MACs. "
                   f"MACs are not the only cost; the pruned weights are about 4x smaller (likely "
                   f"better cache use), and the machine is shared (noise). Not investigated further.")
    low = [r for r in results if r["speedup_over_mac_reduction"] < 0.9 and r["round_to"] == 8 and not r["attention"]]
    if low:
        out.append(f"- Below 1.0 with every width a multiple of 8 ({fmt(low)}): depthwise convolutions "
                   f"and elementwise ops are memory-bound, so their time falls less than their MACs "
                   f"(likely cause, not profiled).")
    for r in results:
        att = r["attention"]
        if not att:
            continue
        mha = next(x for x in att if not x["name"].endswith("out_proj"))
        outp = next(x for x in att if x["name"].endswith("out_proj"))
        heads_kept = mha["after"][0] == mha["before"][0] and outp["after"][1] == outp["before"][1]
        ratio = r["speedup_over_mac_reduction"]
        what = ("the attention's head widths were NOT pruned (q/k/v and out_proj columns kept at full width)"
                if heads_kept else "the attention's q/k/v head widths are pruned along with the model width and the MLP")
        out.append(
            f"- {r['model']}: MAC reduction {r['mac_reduction']:.2f}x, speedup / MAC reduction {ratio:.2f} "
            f"({'latency follows MACs' if ratio >= 0.9 else 'latency falls less than MACs'}); {what} "
            f"(`{mha['name']}`: in_proj {tuple(mha['before'])} -> {tuple(mha['after'])}, out_proj "
            f"{tuple(outp['before'])} -> {tuple(outp['after'])}).")
    return out


def to_markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# ONNX Runtime: pruned vs original torchvision models", "",
             "Produced by:", "", "```", data["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}; python {m['python']}, "
             f"torch {m['torch']}, torchvision {m['torchvision']}, onnx {m['onnx']}, onnxruntime "
             f"{m['onnxruntime']}. Load average (1 min) at start {data['loadavg'][0]:.2f}, at end "
             f"{data['loadavg'][1]:.2f}: the machine is shared, other jobs add noise (interleaving "
             f"spreads it over original and pruned alike, absolute times move more than ratios).", "",
             f"Settings: weights=None, input 1x3x224x224, seed 0, `passes.prune(ratio, importance='l2', "
             f"global_pruning=False, round_to)`; ORT CPUExecutionProvider, {m['cpu_count']} intra-op "
             f"threads, spinning off, default graph optimisation; each row is its own interleaved "
             f"[original, pruned] run, {data['runs']} rounds after {data['warmup']} warmup; p50 latency.", "",
             "| model | ratio | round_to | params before | params after | MACs before | MACs after "
             "| MAC reduction | p50 ms before | p50 ms after | speedup | speedup / MAC reduction | widths %8 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["results"]:
        w = r["widths"]
        lines.append(
            f"| {r['model']} | {r['ratio']} | {r['round_to']} | {r['params_before'] / 1e6:.2f}M "
            f"| {r['params_after'] / 1e6:.2f}M | {r['macs_before'] / 1e9:.3f}G | {r['macs_after'] / 1e9:.3f}G "
            f"| {r['mac_reduction']:.2f}x | {r['ort_p50_ms_before']:.2f} | {r['ort_p50_ms_after']:.2f} "
            f"| {r['latency_speedup']:.2f}x | {r['speedup_over_mac_reduction']:.2f} "
            f"| {w['multiple_of_8']}/{w['pruned_layers']} |")
    lines += ["", "speedup = p50 before / p50 after; MAC reduction = MACs before / MACs after (MACs "
              "from passes.count, attention matmuls included); speedup / MAC reduction = 1.0 means "
              "latency fell exactly as much as MACs; widths %8 = pruned layers whose output width "
              "is a multiple of 8.", ""]
    if data["notes"]:
        lines += ["## Notes", "", *data["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    command = shlex.join(["python", "benchmarks/ort.py", *(sys.argv[1:] if argv is None else argv)])
    load0 = os.getloadavg()[0]
    results, benches = [], {}
    with tempfile.TemporaryDirectory(prefix="passes-ort-bench-") as tmp:
        for name in names:
            rows, benches[name] = run_model(name, MODELS.get(name, [(0.5, 8)]), args.runs, args.warmup, Path(tmp))
            results += rows
    data = {"command": command, "machine": machine_info(), "loadavg": [load0, os.getloadavg()[0]],
            "runs": args.runs, "warmup": args.warmup, "results": results, "notes": notes(results),
            "bench": benches}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort.json").write_text(json.dumps(data, indent=1))
    md = to_markdown(data)
    (args.out / "ort.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

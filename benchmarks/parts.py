"""`prune(..., part="backbone")` on every torchvision detector, which fx cannot trace whole.

Each detector (weights=None, `min_size=max_size=128` except SSD, which resizes to its own size)
is called with one 3x128x128 image; passes prunes its backbone at ratio 0.5 (local L2) on the
batch the backbone receives, verifies it (masked equivalence on the backbone), and the whole
pruned detector is run once more. Reported per model: the backbone's params and MACs before and
after, the verification, the output keys of the pruned detector, and the time of the prune call
(capture run, prune, verify, the whole-model run).

    python benchmarks/parts.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision.models import detection

import passes
from passes.report import code_version, cpu_model

RESULTS = Path(__file__).parent / "results"


def run(name: str) -> dict:
    torch.manual_seed(0)
    kw = {} if name.startswith("ssd") else dict(min_size=128, max_size=128)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw).eval()
    images = [torch.rand(3, 128, 128)]
    t = time.perf_counter()
    try:
        r = passes.prune(model, images, part="backbone", ratio=0.5)
    except passes.PassesError as e:
        return dict(model=name, ok=False, error=f"{type(e).__name__}: {e}"[:300])
    seconds = time.perf_counter() - t
    with torch.no_grad():
        out = r.model(images)
    rep, v = r.report, r.report.verify
    return dict(model=name, ok=v.ok, exact=v.exact, max_rel_error=v.max_rel_error, seconds=seconds,
                params_before=rep.params_before, params_after=rep.params_after,
                macs_before=rep.macs_before, macs_after=rep.macs_after, outputs=sorted(out[0]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=torchvision.models.list_models(module=detection))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        rows.append(run(name))
        print(json.dumps(rows[-1]), flush=True)
    machine = dict(code=code_version(), cpu=cpu_model(), cores=torch.get_num_threads(), python=platform.python_version(),
                   torch=torch.__version__, torchvision=torchvision.__version__)
    command = " ".join(["python benchmarks/parts.py", *(sys.argv[1:] if argv is None else argv)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parts.json").write_text(json.dumps(dict(command=command, machine=machine, rows=rows), indent=1))
    ok = sum(r["ok"] and r.get("exact", False) for r in rows)
    lines = ["# Detectors: the backbone pruned with part=\"backbone\"", "", f"Command: `{command}`  ",
             f"Machine: {machine}  ", "One 3x128x128 image, ratio 0.5, local L2; params and MACs are the backbone's "
             "(the part passes prunes); the pruned detector is run once more after the backbone's verification.", "",
             f"{ok}/{len(rows)} backbones pruned with exact masked equivalence, and their detectors run.", "",
             "| model | backbone params | backbone MACs | masked equivalence (max rel. error) | detector outputs | prune (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"] or "params_before" not in r:
            lines.append(f"| {r['model']} | - | - | ✗ {r.get('error', 'verification failed')} | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['params_before']:,} → {r['params_after']:,} ({r['params_after'] / r['params_before']:.1%}) "
                     f"| {r['macs_before']:,} → {r['macs_after']:,} ({r['macs_after'] / r['macs_before']:.1%}) "
                     f"| {'exact' if r['exact'] else 'not exact'} ({r['max_rel_error']:.2g}) | {', '.join(r['outputs'])} "
                     f"| {r['seconds']:.1f} |")
    (RESULTS / "parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

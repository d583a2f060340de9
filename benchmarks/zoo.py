"""The torchvision zoo: passes and Torch-Pruning on every model, each checked the same way.

For every model `torchvision.models.list_models()` returns (classification, segmentation, video,
optical flow, detection), and one model per timm family (`--family timm`, needs timm: the
`bench` extra), weights=None, eval mode, each in its own subprocess with a timeout:

- passes: `prune(model, x, ratio=0.5, importance="l2")` (local ranking); the analysis + rewrite
  are timed alone (`verify=False`), then `passes.verify` runs the same check `prune` runs by
  default (forward/shape + masked equivalence) and a failure is recorded as prune would raise it;
- Torch-Pruning on the same model: `MagnitudePruner` with `GroupMagnitudeImportance(p=2)`,
  `pruning_ratio=0.5`, `global_pruning=False`, the output layers ignored (passes pins model
  outputs by itself), `num_heads` for every `nn.MultiheadAttention` (its documented argument);
- both pruned models and the original: forward, output shapes, params and MACs (the same counter,
  `passes.count`), ONNX export with ONNX Runtime parity (`passes.export_onnx`), and ORT latency of
  the three files interleaved in one `passes.benchmark` run (p50 ms).

A tool succeeds on a model when its pruned model runs, every output keeps its shape,
MACs after <= 0.6 x MACs before, masked equivalence holds (passes only; Torch-Pruning's plan
cannot be recovered, so "n/a"),
the ONNX file exports and ONNX Runtime matches torch. Latency is reported, never judged.

    python benchmarks/zoo.py [--family classification|segmentation|video|optical_flow|detection|timm|all]
                             [--models NAME ...] [--timeout 600] [--jobs 1] [--fresh]
    python benchmarks/zoo.py --one NAME --json-out FILE     # one model, in this process

Results: benchmarks/results/zoo.json (every row, every command), zoo.csv and zoo.md. A run
replaces the rows of the models it ran and keeps the others (`--fresh` starts over), so the
families can be run one after another. A passes failure also writes a repro script to
/tmp/passes_bugs/zoo_<model>.py.
"""

from __future__ import annotations

import argparse
import copy
import csv
import fcntl
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision
from passes.models import redraw_zero_matrices, torchvision_model
from passes.report import cpu_model
from passes.verify import flatten_outputs

RESULTS = Path(__file__).parent / "results"
BUGS = Path("/tmp/passes_bugs")
FAMILIES = ["classification", "segmentation", "video", "optical_flow", "detection", "timm"]
_MODULES = {"classification": torchvision.models, "segmentation": torchvision.models.segmentation,
            "video": torchvision.models.video, "optical_flow": torchvision.models.optical_flow,
            "detection": torchvision.models.detection}
MAX_MAC_RATIO = 0.6
DETECTION_HEADS = ("roi_heads", "rpn.head", "head")  # Torch-Pruning leaves these alone (output layers)


# ---------------------------------------------------------------- models and inputs

def family_of(name: str) -> str:
    if name.startswith("timm/") and _timm_available() and name[5:] in _timm_names():
        return "timm"
    for fam in FAMILIES[:-1]:
        if name in torchvision.models.list_models(module=_MODULES[fam]):
            return fam
    raise SystemExit(f"error: {name!r} is not a torchvision classification, segmentation, video, "
                     f"optical flow or detection model, nor timm/NAME for a timm model")


def models_of(families: list[str]) -> list[str]:
    fams = FAMILIES if "all" in families else [f for f in FAMILIES if f in families]
    return [n for f in fams for n in (timm_models() if f == "timm" else torchvision.models.list_models(module=_MODULES[f]))]


# timm: one model per model module of the installed timm (a module is a family: ResNet, ViT,
# MobileViT, ...), the variant whose name first carries one of these size words (then the
# shortest name): the smallest member in practice, so the whole library fits in a run
_TIMM_SIZES = ("atto", "femto", "pico", "nano", "xxs", "xxsmall", "xx_small", "tiny", "xs", "small", "s0",
               "b0", "_t", "_s", "18", "050", "100", "mini", "lite")


def _timm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("timm") is not None


def _timm_names() -> set[str]:
    import timm
    return set(timm.list_models())


def timm_models() -> list[str]:
    if not _timm_available():
        raise SystemExit("error: the timm family needs timm: pip install -e '.[bench]'")
    import timm
    from timm.models import _registry

    def rank(n):
        return next((i for i, k in enumerate(_TIMM_SIZES) if k in n), len(_TIMM_SIZES)), len(n), n
    by_module: dict[str, list[str]] = {}
    for n in timm.list_models():
        by_module.setdefault(_registry._model_to_module.get(n, ""), []).append(n)
    return sorted("timm/" + min(names, key=rank) for names in by_module.values())  # timm/: resnet18 is in both


def spec(name: str) -> tuple[dict, list[tuple[int, ...]]]:
    """Constructor kwargs and input shapes: the smallest input each model allows, near 64x64."""
    fam = family_of(name)
    if fam == "timm":
        import timm
        return {}, [(1, *timm.get_pretrained_cfg(name[5:]).input_size)]  # the size the model was made for
    if fam == "classification":
        if name in ("googlenet", "inception_v3"):
            size = 96 if name == "inception_v3" else 64  # inception_v3 needs >= 75
            return {"aux_logits": False, "init_weights": False}, [(1, 3, size, size)]
        if name.startswith("vit_"):
            patch = int(name.rsplit("_", 1)[1])
            size = 64 // patch * patch  # 64, or 56 for patch 14 (the constructor wants a multiple)
            return {"image_size": size}, [(1, 3, size, size)]
        if name == "maxvit_t":
            return {}, [(1, 3, 224, 224)]  # its attention grids are fixed by the constructor
        return {}, [(1, 3, 64, 64)]
    if fam == "segmentation":
        return {"weights_backbone": None}, [(1, 3, 64, 64)]
    if fam == "video":
        if name in ("s3d",) or name.startswith("mvit"):
            return {}, [(1, 3, 16, 224, 224)]  # s3d's final pooling, mvit's fixed position embeddings
        return {}, [(1, 3, 4, 32, 32)]
    if fam == "optical_flow":
        return {}, [(1, 3, 128, 128)] * 2  # the correlation pyramid needs feature maps >= 16
    if name.startswith("ssd"):
        return {"weights_backbone": None}, [(1, 3, 128, 128)]  # SSD resizes to its fixed size
    return {"weights_backbone": None, "min_size": 128, "max_size": 128}, [(1, 3, 128, 128)]


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if family_of(name) != "timm":
        return torchvision_model(name, **kw)  # weights=None, eval, all-zero weight matrices re-drawn
    import timm
    return redraw_zero_matrices(timm.create_model(name[5:], pretrained=False, **kw).eval())


def inputs_for(shapes) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return tuple(torch.randn(*s) for s in shapes)



def output_layers(model: torch.nn.Module, outputs: list[torch.Tensor], family: str) -> list[torch.nn.Module]:
    """The layers that produce the model's output channels (for Torch-Pruning's ignored_layers):
    every conv/linear whose output width is the output's dim 1 (classes, flow components);
    for detection, every conv/linear in the heads."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    if family == "detection":
        return [m for n, m in layers if any(n == h or n.startswith(h + ".") for h in DETECTION_HEADS)]
    width = outputs[0].shape[1]
    return [m for _, m in layers if (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels) == width]


# ---------------------------------------------------------------- one model

def _err(stage: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{stage}: {type(exc).__name__}: {first}"[:600]


def _forward(model, x):
    with torch.no_grad():
        return flatten_outputs(model(*x))


def _check_pruned(row: dict, key: str, model, x, ref_shapes, onnx_path: Path) -> str | None:
    """Forward, shapes, params/MACs, MAC ratio, ONNX export + parity; the first failure or None."""
    import passes
    try:
        got = _forward(model, x)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        return _err("forward", e)
    shapes = [tuple(t.shape) for t in got]
    if shapes != ref_shapes:
        return f"output shapes changed: {ref_shapes} -> {shapes}"[:600]
    row[f"{key}_params"], row[f"{key}_macs"] = passes.count(model, x)
    ratio = row[f"{key}_macs"] / max(row["macs_before"], 1)
    failure = None
    if ratio > MAX_MAC_RATIO:
        failure = f"MACs ratio {ratio:.2f} > {MAX_MAC_RATIO}"
    try:
        res = passes.export_onnx(model, x, onnx_path)
        row[f"{key}_onnx_rel_err"] = res.max_rel_error
        row[f"{key}_onnx"] = str(onnx_path)
    except Exception as e:  # noqa: BLE001
        failure = failure or _err("onnx", e)
    return failure


def run_passes(row: dict, model, x, ref_shapes, tmp: Path) -> torch.nn.Module | None:
    import passes
    from passes.errors import VerificationError
    try:
        t = time.perf_counter()
        r = passes.prune(model, x, ratio=0.5, importance="l2", verify=False)
        row["passes_analysis_s"] = time.perf_counter() - t
        t = time.perf_counter()
        v = passes.verify(model, r, x)  # what prune(verify=True) runs, timed apart
        row["passes_verify_s"] = time.perf_counter() - t
        r.report.verify = v
        row["passes_units"] = f"{r.report.units_removed}/{r.report.units}"
        row["equivalence"] = "exact" if v.exact else ("n/a: " + "; ".join(v.inexact))[:300]
        row["max_rel_error"] = v.max_rel_error
        if not v.ok:
            raise VerificationError(v.message, v)
    except Exception as e:  # noqa: BLE001
        row["passes_error"] = _err("prune", e)
        return None
    row["passes_error"] = _check_pruned(row, "passes", r.model, x, ref_shapes, tmp / "passes.onnx")
    return r.model


def run_tp(row: dict, model, x, ref_shapes, outputs, family: str, tmp: Path) -> torch.nn.Module | None:
    try:
        import torch_pruning as tp
        m = copy.deepcopy(model)
        ignored = output_layers(m, outputs, family)
        heads = {a: a.num_heads for a in m.modules() if isinstance(a, torch.nn.MultiheadAttention)}
        row["tp_ignored"] = len(ignored)
        t = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            m, x[0] if len(x) == 1 else x, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, global_pruning=False, ignored_layers=ignored, num_heads=heads)
        pruner.step()
        row["tp_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001
        row["tp_error"] = _err("prune", e)
        return None
    row["tp_error"] = _check_pruned(row, "tp", m, x, ref_shapes, tmp / "tp.onnx")
    return m


def run_one(name: str, *, tp: bool = True, latency: bool = True, kwargs: dict | None = None,
            shapes: list | None = None, runs: int = 20, warmup: int = 3, checkpoint=None) -> dict:
    """Every check on one model; never raises for a model's failure (it is in the row).

    `checkpoint(row)` is called as each stage starts (row["stage"] names it), so a parent that
    has to kill this process still knows which stage ran and what the earlier ones found."""
    import passes

    def stage(what):
        row["stage"] = what
        if checkpoint is not None:
            checkpoint(row)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    family = family_of(name)
    kw0, shapes0 = spec(name)
    kw = kw0 if kwargs is None else kwargs
    shapes = shapes0 if shapes is None else shapes
    row = {"model": name, "family": family, "input": " ".join("x".join(map(str, s)) for s in shapes),
           "kwargs": json.dumps(kw), "passes_ok": False, "tp_ok": False}
    stage("original")
    try:
        model = build(name, **kw)
        x = inputs_for(shapes)
        ref = _forward(model, x)
        row["params_before"], row["macs_before"] = passes.count(model, x)
    except Exception as e:  # noqa: BLE001
        row["passes_error"] = row["tp_error"] = _err("original", e)
        row["stage"] = "done"
        row["seconds"] = time.perf_counter() - t_start
        return row
    ref_shapes = [tuple(t.shape) for t in ref]
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name.replace('/', '_')}-") as tmp:
        tmp = Path(tmp)
        if latency:  # the benchmark's baseline (and a check that the original exports at all)
            stage("original onnx")
            try:
                row["orig_onnx_rel_err"] = passes.export_onnx(model, x, tmp / "original.onnx").max_rel_error
                row["orig_onnx"] = str(tmp / "original.onnx")
            except Exception as e:  # noqa: BLE001
                row["orig_error"] = _err("onnx", e)
        stage("passes")
        pruned = run_passes(row, model, x, ref_shapes, tmp)
        row["passes_ok"] = pruned is not None and row["passes_error"] is None
        del pruned
        gc.collect()
        if tp:
            stage("tp")
            pruned = run_tp(row, model, x, ref_shapes, ref, family, tmp)
            row["tp_ok"] = pruned is not None and row["tp_error"] is None
            del pruned
        else:
            row["tp_error"] = "not run"
        del model
        gc.collect()
        if latency:
            stage("latency")
            _latency(row, x, runs, warmup)
        for k in ("orig_onnx", "passes_onnx", "tp_onnx"):
            row.pop(k, None)
    row["stage"] = "done"
    row["seconds"] = time.perf_counter() - t_start
    return row


def _latency(row: dict, x, runs: int, warmup: int) -> None:
    import passes
    files = [(k, row[f"{k}_onnx"]) for k in ("orig", "passes", "tp") if row.get(f"{k}_onnx")]
    if not files or files[0][0] != "orig":
        return
    try:
        rep = passes.benchmark([f for _, f in files], x, runs=runs, warmup=warmup, names=[k for k, _ in files])
        for (k, _), r in zip(files, rep.rows):
            row[f"{k}_ms"] = r.p50_ms
    except Exception as e:  # noqa: BLE001
        row["bench_error"] = _err("benchmark", e)


def write_repro(name: str, reason: str) -> Path:
    """A standalone script that rebuilds the model as the zoo does and runs passes on it."""
    kw, shapes = spec(name)
    BUGS.mkdir(parents=True, exist_ok=True)
    safe = name.replace("/", "_")
    path = BUGS / f"zoo_{safe}.py"
    if family_of(name) == "timm":
        make = (f"import timm\nfrom passes.models import redraw_zero_matrices\n"
                f"model = redraw_zero_matrices(timm.create_model({name[5:]!r}, pretrained=False).eval())  # as the zoo builds it")
    else:
        make = (f"from passes.models import torchvision_model\n"
                f"model = torchvision_model({name!r}, **{kw!r})  # as the zoo and the tests build it")
    path.write_text(f'''"""passes fails on {name} in benchmarks/zoo.py.

Recorded failure: {reason}
Run: /work/venv/bin/python {path}
"""
import torch
import passes

torch.manual_seed(0)
{make}
torch.manual_seed(1)
x = tuple(torch.randn(*s) for s in {shapes!r})
with torch.no_grad():
    ref = model(*x)
r = passes.prune(model, x, ratio=0.5, importance="l2")  # verifies; raises VerificationError
print(r.report.summary(), r.report.verify.message)
params0, macs0 = passes.count(model, x)
params1, macs1 = passes.count(r.model, x)
print("MACs ratio", macs1 / macs0)
assert macs1 <= {MAX_MAC_RATIO} * macs0
passes.export_onnx(r.model, x, "/tmp/passes_bugs/zoo_{safe}.onnx")  # ONNX + ORT parity
print("ok")
''')
    return path


def one_main(name: str, json_out: str, tp: bool, latency: bool) -> None:
    def checkpoint(row):
        Path(json_out).write_text(json.dumps(row, default=str))

    try:
        row = run_one(name, tp=tp, latency=latency, checkpoint=checkpoint)
    except Exception as e:  # noqa: BLE001 - a bug here, not in a model: still a row
        row = {"model": name, "family": family_of(name), "passes_ok": False, "tp_ok": False,
               "passes_error": _err("zoo", e), "tp_error": _err("zoo", e), "trace": traceback.format_exc(), "stage": "done"}
    if not row["passes_ok"] and row.get("passes_error"):
        row["repro"] = str(write_repro(name, row["passes_error"]))
    Path(json_out).write_text(json.dumps(row, default=str))


# ---------------------------------------------------------------- the parent

def run_child(name: str, timeout: float, tp: bool, latency: bool, max_rss_gb: float = 14) -> dict:
    with tempfile.TemporaryDirectory(prefix="zoo-row-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--json-out", str(out)]
        cmd += [] if tp else ["--no-tp"]
        cmd += [] if latency else ["--no-latency"]
        t = time.perf_counter()
        with open(Path(tmp) / "err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            reason = _watch(proc, timeout, max_rss_gb)
        code = proc.returncode
        seconds = time.perf_counter() - t
        row = json.loads(out.read_text()) if out.exists() else {}
        if row.get("stage") != "done":  # killed, crashed, or a bug in this script
            if reason is None:
                tail = [l for l in (Path(tmp) / "err").read_text(errors="replace").splitlines() if l.strip()]
                what = "killed by SIGKILL" if code == -9 else f"exit code {code}"
                reason = f"crashed ({what})" + (f": {tail[-1][:300]}" if tail else "")
            row = _failed_row(name, row, reason)
        row["wall_s"] = seconds
        return row


def _failed_row(name: str, row: dict, reason: str) -> dict:
    """A row for a child that did not finish: the stage it was in fails with `reason`."""
    stage = row.get("stage", "original")
    reason = f"{reason} during {stage}"
    base = {"model": name, "family": family_of(name), "input": " ".join(
        "x".join(map(str, s)) for s in spec(name)[1]), "passes_ok": False, "tp_ok": False}
    row = {**base, **row}
    if stage in ("original", "original onnx", "passes"):
        row["passes_ok"], row["passes_error"] = False, reason
        row["repro"] = str(write_repro(name, reason))
    if stage != "latency":
        row["tp_ok"], row["tp_error"] = False, reason if stage != "passes" else "not reached: " + reason
    else:
        row["bench_error"] = reason
    return row


def _tree_rss_gb(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc), in GB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, ValueError):
            pass
    return total / 2**30


def _watch(proc: subprocess.Popen, timeout: float, max_rss_gb: float) -> str | None:
    """Wait for the child; kill its process group on timeout or when it holds too much memory
    (the machine is shared: a kill here beats the kernel's OOM killer picking someone else)."""
    start = time.perf_counter()
    peak = 0.0
    while proc.poll() is None:
        rss = _tree_rss_gb(proc.pid)
        peak = max(peak, rss)
        reason = None
        if time.perf_counter() - start > timeout:
            reason = f"timeout after {timeout:.0f} s"
        elif rss > max_rss_gb:
            reason = f"killed at {rss:.1f} GB resident (limit {max_rss_gb:g} GB)"
        if reason:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
            proc.wait()
            return reason
        time.sleep(0.5)
    return None



def machine() -> dict:
    import onnxruntime
    try:
        import torch_pruning as tp
        tpv = tp.__version__
    except ImportError:
        tpv = None
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    timm_version = None
    if _timm_available():
        import timm
        timm_version = timm.__version__
    return dict(cpu=cpu_model(), cores=os.cpu_count(), ram_gb=mem, python=platform.python_version(),
                torch=torch.__version__, torchvision=torchvision.__version__,
                onnxruntime=onnxruntime.__version__, torch_pruning=tpv, timm=timm_version)


COLUMNS = ["model", "family", "input", "passes_ok", "passes_error", "tp_ok", "tp_error",
           "params_before", "passes_params", "tp_params", "macs_before", "passes_macs", "tp_macs",
           "equivalence", "max_rel_error", "passes_units", "orig_onnx_rel_err", "passes_onnx_rel_err",
           "tp_onnx_rel_err", "orig_error", "orig_ms", "passes_ms", "tp_ms", "bench_error",
           "passes_analysis_s", "passes_verify_s", "tp_s", "tp_ignored", "seconds", "wall_s", "kwargs", "repro"]


def _short(command: str) -> str:
    """A command line with a long --models list shortened to its first names and the count."""
    words = command.split()
    if "--models" not in words:
        return command
    i = words.index("--models") + 1
    j = next((k for k in range(i, len(words)) if words[k].startswith("--")), len(words))
    if j - i <= 6:
        return command
    return " ".join(words[:i] + words[i:i + 3] + [f"... ({j - i} models)"] + words[j:])


def _cell(text) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _m(v, scale=1e6, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v / scale)


def _verdict(row, tool) -> str:
    return "ok" if row.get(f"{tool}_ok") else "✗ " + _cell(row.get(f"{tool}_error") or "?")


def summary_lines(rows: list[dict]) -> list[str]:
    lines = []
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    for tool, label in (("passes", "passes"), ("tp", "Torch-Pruning")):
        n = sum(bool(r.get(f"{tool}_ok")) for r in rows)
        per = ", ".join(f"{f} {sum(bool(r.get(f'{tool}_ok')) for r in rows if r['family'] == f)}/"
                        f"{sum(r['family'] == f for r in rows)}" for f in fams)
        lines.append(f"{label}: {n}/{len(rows)} succeeded ({per})")
    return lines


def write_results(state: dict) -> None:
    rows = sorted(state["rows"].values(), key=lambda r: (FAMILIES.index(r["family"]), r["model"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zoo.json").write_text(json.dumps(state, indent=1, default=str))
    with open(RESULTS / "zoo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    m = state["machine"]
    lines = ["# passes and Torch-Pruning on the torchvision zoo and timm", "",
             "Produced by (in this order; a later run replaces the rows of the models it ran):", ""]
    runs = sorted(state["runs"], key=lambda r: r["started"])
    lines += [f"- `{_short(r['command'])}` ({r['started']}, {r['seconds'] / 60:.1f} min, {r['models']} models"
              + (f"; {r['note']}" if r.get("note") else "") + ")" for r in runs]
    if runs:
        begin = min(time.mktime(time.strptime(r["started"][:19], "%Y-%m-%d %H:%M:%S")) for r in runs if len(r["started"]) > 16)
        end = max(time.mktime(time.strptime(r["started"][:19], "%Y-%m-%d %H:%M:%S")) + r["seconds"]
                  for r in runs if len(r["started"]) > 16)
        serial = sum(r.get("wall_s", 0) for r in rows)
        lines += ["", f"Total: {len(rows)} models; {(end - begin) / 60:.0f} min from the first run's start to the "
                  f"last run's end (runs overlapping), {serial / 60:.0f} min of per-model process time summed."]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB; Python {m['python']}, "
              f"torch {m['torch']}, torchvision {m['torchvision']}, onnxruntime {m['onnxruntime']}, "
              f"torch-pruning {m['torch_pruning']}" + (f", timm {m['timm']}" if m.get("timm") else "") + ".",
              "", "## Summary", ""]
    lines += [f"- {l}" for l in summary_lines(rows)]
    lines += ["", "## Notes", "",
              "- Both tools: ratio 0.5 of every group's channels, local ranking, L2 magnitude "
              "(passes `prune(model, x, ratio=0.5, importance=\"l2\")`; Torch-Pruning `MagnitudePruner` with "
              "`GroupMagnitudeImportance(p=2)`, `pruning_ratio=0.5`, `global_pruning=False`). passes pins the "
              "model's outputs by itself and gets no ignored layers; Torch-Pruning ignores every conv/linear whose "
              "output width is the output's dim 1 (the classifier, both LR-ASPP classifiers, RAFT's flow head "
              "output), for detection every conv/linear under `roi_heads`, `rpn.head`, `head`, and gets "
              "`num_heads` for each `nn.MultiheadAttention` (ViT). No other per-model help for either tool.",
              "- Success: the pruned model runs, every output keeps its shape, MACs after <= 0.6 x MACs before, "
              "masked equivalence holds (passes only: Torch-Pruning's plan cannot be recovered, so for it "
              "equivalence is n/a and it is judged on the other checks), the ONNX file exports (`passes.export_onnx`: checker, shape inference) and "
              "ONNX Runtime matches torch (batch 1 and 2). The error shown is the first check that failed.",
              "- Params and MACs: `passes.count(model, x)` for all three models (one counter, so comparable); "
              "M = millions. ORT ms: p50 of 20 interleaved runs after 3 warmup (`passes.benchmark`, the three "
              "files in one process, spinning off, 2 threads); a machine shared with other jobs, so single "
              "numbers are noisy. Latency is reported, not judged.",
              "- Analysis s: passes `prune(..., verify=False)` (trace, shapes, MACs, channel analysis, plan, "
              "rewrite); verify s: `passes.verify`, the check `prune` runs by default; TP s: "
              "`MagnitudePruner(...)` + `step()`.",
              "- Inputs (weights=None, eval, all-zero weight matrices re-randomised, `torch.manual_seed(0)`): "
              "classification 1x3x64x64; ViT `image_size=64` (56 for the patch-14 vit_h_14, whose "
              "constructor wants a multiple of 14); maxvit_t 224 (fixed grids); inception_v3 96; googlenet and "
              "inception_v3 `aux_logits=False, init_weights=False`; segmentation 64x64 `weights_backbone=None`; "
              "video 1x3x4x32x32 (s3d and mvit need 16x224x224); optical flow two 1x3x128x128 images (RAFT's "
              "correlation pyramid needs 128); detection 1x3x128x128, `min_size=max_size=128` except SSD; "
              "timm: one model per timm model module (family), the variant whose name first carries a size "
              "word (atto, femto, pico, nano, xxs, tiny, small, ...; `zoo.timm_models()`), "
              "`timm.create_model(name, pretrained=False)` at its pretrained config's input size.",
              "- Each model runs in its own subprocess (stages: original ONNX export, passes, Torch-Pruning, "
              "latency) with a timeout and a resident-memory limit; a timeout, kill or crash fails the stage it "
              "was in (and the tools after it: \"not reached\"), earlier stages keep their results. A latency "
              "or original-export failure is shown in the ORT column and judges neither tool; a model whose "
              "Torch-Pruning stage was killed has no latency numbers (the benchmark runs last). Detection: "
              "torch.fx cannot trace the models (passes' front end), and most originals already fail the ONNX "
              "check (batch-2 parity or ORT reshape errors), so no latency there either.", "",
              "## Results", "",
              "| model | input | passes | Torch-Pruning | params M before / passes / TP | MMACs before / passes / TP "
              "| equivalence (passes; TP n/a) | ORT ms before / passes / TP | analysis s passes / verify / TP |",
              "|---|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r["family"] == fam]
        if not fam_rows:
            continue
        lines.append(f"| **{fam}** | | | | | | | | |")
        for r in fam_rows:
            eq = r.get("equivalence") or "-"
            if eq == "exact" and r.get("max_rel_error") is not None:
                eq = f"exact, rel err {r['max_rel_error']:.1e}"
            ort_ms = " / ".join(_m(r.get(k), 1, '{:.2f}') for k in ('orig_ms', 'passes_ms', 'tp_ms'))
            extra = "; ".join(r[k] for k in ("orig_error", "bench_error") if r.get(k))
            ort_ms = ort_ms + (f" ({_cell(extra)})" if extra else "")
            secs = " / ".join(_m(r.get(k), 1, "{:.2f}") for k in ("passes_analysis_s", "passes_verify_s", "tp_s"))
            lines.append(
                f"| {r['model']} | {r.get('input', '')} | {_verdict(r, 'passes')} | {_verdict(r, 'tp')} "
                f"| {' / '.join(_m(r.get(k)) for k in ('params_before', 'passes_params', 'tp_params'))} "
                f"| {' / '.join(_m(r.get(k)) for k in ('macs_before', 'passes_macs', 'tp_macs'))} "
                f"| {_cell(eq)} | {ort_ms} "
                f"| {secs} |")
    lines += ["", "## Summary", ""] + [f"- {l}" for l in summary_lines(rows)] + [""]
    (RESULTS / "zoo.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", metavar="NAME", help="run one model in this process (what the parent runs)")
    ap.add_argument("--json-out", help="with --one: write its row here")
    ap.add_argument("--models", nargs="+", help="these models (default: the family's)")
    ap.add_argument("--family", nargs="+", default=["classification"], choices=FAMILIES + ["all"])
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model (default 600)")
    ap.add_argument("--jobs", type=int, default=1, help="models at once (default 1: 2 cores)")
    ap.add_argument("--max-rss-gb", type=float, default=14, help="kill a model's process above this (default 14)")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows instead of merging")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--no-latency", action="store_true", help="skip the ORT latency benchmark")
    ap.add_argument("--render", action="store_true", help="only rewrite zoo.md and zoo.csv from zoo.json")
    args = ap.parse_args(argv)
    if args.render:
        write_results(json.loads((RESULTS / "zoo.json").read_text()))
        return
    if args.one:
        if not args.json_out:
            ap.error("--one needs --json-out")
        one_main(args.one, args.json_out, not args.no_tp, not args.no_latency)
        return
    names = args.models or models_of(args.family)
    for n in names:
        family_of(n)
    command = "python benchmarks/zoo.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    run = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "models": len(names)}
    t0 = time.perf_counter()

    def update(row=None):
        """Read, change and write the results under a lock: runs of other families may be writing."""
        run["seconds"] = time.perf_counter() - t0
        RESULTS.mkdir(exist_ok=True)
        with open(Path(tempfile.gettempdir()) / "passes-zoo.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state_file = RESULTS / "zoo.json"
            fresh = args.fresh and row is None
            state = json.loads(state_file.read_text()) if state_file.exists() and not fresh else {"runs": [], "rows": {}}
            state["machine"] = machine()
            state["runs"] = [r for r in state["runs"] if r["started"] != run["started"] or r["command"] != command] + [run]
            if row is not None:
                state["rows"][row["model"]] = row
            write_results(state)

    update()

    def one(name):
        row = run_child(name, args.timeout, not args.no_tp, not args.no_latency, args.max_rss_gb)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = {}
        for i, row in enumerate(pool.map(one, names), 1):
            done[row["model"]] = row
            update(row)
            p = "ok" if row["passes_ok"] else row.get("passes_error")
            t = "ok" if row["tp_ok"] else row.get("tp_error")
            print(f"[{i}/{len(names)} {run['seconds'] / 60:.1f} min] {row['model']} ({row['wall_s']:.0f} s): "
                  f"passes {p} | TP {t}", flush=True)
    print("\n".join(summary_lines(list(done.values()))))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; results in {RESULTS}/zoo.md, zoo.csv")


if __name__ == "__main__":
    main()

"""The `passes` command: prune (and export, benchmark, report), bench, inspect.

    passes prune [MODEL] [--ratio 0.5] [--round-to 8] [--input-shape 1,3,224,224] [--out DIR] ...
    passes prune torchvision:fasterrcnn_resnet50_fpn --part backbone --list-input --input-shape 3,320,320
    passes bench original.onnx pruned.onnx [--input-shape ...] [--runs 50] [--json FILE]
    passes inspect MODEL [--input-shape ...] [--part NAME [--list-input]]

MODEL forms are in `passes.models`; the report is built by `passes.report`. `prune` writes
into a hidden temporary folder next to DIR and renames it to DIR only when every step passed,
so a failed run leaves no partial result (an existing DIR is replaced only by a complete run,
and only if it is empty or an earlier `passes prune` output). Errors the user can fix print
one line, `error: <what went wrong>; <what to do>`, on stderr: exit code 2 for bad input
(model spec, input shape, options, output folder, untraceable model), 1 for a failed check
(verification, ONNX export, ORT parity). Other exceptions keep their traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ExportError, InputError, ParityError, PassesError, TraceError, VerificationError
from .models import check_runs, format_shapes, load_model, make_inputs, parse_shapes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Structured pruning with torch.fx: prune, export to ONNX, benchmark in ONNX Runtime.")

OUTPUT_FILES = ("pruned.pt", "plan.json", "original.onnx", "pruned.onnx", "report.md", "report.json")
DEFAULT_MODEL = "torchvision:resnet18"
DEFAULT_SHAPE = "1,3,224,224"


class UsageError(InputError):
    """A bad command-line value; the message says what to do."""

    says_what_to_do = True


class OutputError(UsageError):
    """The output folder cannot be written or must not be replaced."""


class SaveError(PassesError):
    """A result could not be written (e.g. the pruned model does not pickle)."""

    says_what_to_do = True


# ------------------------------------------------------------------------------------------
# errors: one line, exit code by category

def _hint(e: Exception) -> str:
    text = str(e)
    if getattr(e, "says_what_to_do", False):
        return ""
    if isinstance(e, TraceError):
        return "" if "Fix:" in text else "make the forward traceable by torch.fx"
    if isinstance(e, InputError):
        if "example" in text:
            return "pass the shape the model expects with --input-shape"
        if "ignored_layers" in text:
            return "check the --ignore names against `passes inspect MODEL`"
        return "check the options (passes COMMAND --help)"
    if isinstance(e, VerificationError):
        return ("the pruned model does not match the masked original, a passes bug: please report "
                "it; meanwhile --ignore the layers involved")
    if isinstance(e, ParityError):
        return ("ONNX Runtime disagrees with torch: check for code paths that differ under export "
                "(torch.onnx.is_in_onnx_export) or data-dependent branches in the forward")
    if isinstance(e, ExportError):
        return "" if "hint:" in text else "replace the op named above or try another exporter/opset"
    return "please report this with the model; meanwhile --ignore the layers involved"


def _exit_code(e: Exception) -> int:
    return 2 if isinstance(e, (InputError, TraceError)) else 1


@contextlib.contextmanager
def _user_errors(err: Console) -> Iterator[None]:
    try:
        yield
    except PassesError as e:
        message = " ".join(str(e).split())  # one line
        hint = _hint(e)
        err.print(f"error: {message}" + (f"; {hint}" if hint else ""), markup=False,
                  highlight=False, soft_wrap=True)
        raise typer.Exit(_exit_code(e)) from None


def _consoles() -> tuple[Console, Console]:
    return Console(highlight=False), Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _step(err: Console, label: str, timings: dict) -> Iterator[None]:
    start = time.perf_counter()
    with err.status(f"{label} ..."):
        yield
    timings[label] = round(time.perf_counter() - start, 3)
    err.print(f"[green]done[/] {label} ({timings[label]:.1f} s)")


def _inputs(shape: str, seed: int, part: str | None = None, list_input: bool = False) -> tuple[list, tuple]:
    """(shapes, the model's positional arguments): the example tensors, or with `list_input`
    one list holding them (a detector's `[image]`), which only a part can be traced from."""
    if list_input and part is None:
        raise UsageError("--list-input calls the model with a list of tensors, which torch.fx cannot "
                         "trace as a whole model; add --part NAME, a submodule called with tensors "
                         "(a torchvision detector: --part backbone)")
    shapes = parse_shapes(shape)
    tensors = make_inputs(shapes, seed)
    return shapes, ([*tensors],) if list_input else tensors


# ------------------------------------------------------------------------------------------
# output folder: staged, moved into place at the end

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Staging:
    """A temporary folder next to `out`; `commit()` renames it to `out` (replacing it)."""

    def __init__(self, out: Path):
        self.shown = str(out)
        self.out = Path(os.path.abspath(out.expanduser()))
        self.created: list[Path] = []
        self.committed = False
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output path {self.shown!r} exists and is not a folder; pass a folder with --out")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / "report.json").is_file():
            raise OutputError(f"refusing to replace {self.shown!r}: it is not empty and holds no earlier "
                              f"report.json; pass a new or empty folder with --out")
        missing, p = [], self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self.created.append(d)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            self.tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the staging phase only
        except OSError as e:
            self._remove_parents()
            raise OutputError(f"cannot write the output folder {self.shown!r} "
                              f"({e.strerror or e}); pass a writable folder with --out") from e

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "dir")
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if old is not None:
                os.replace(old / "dir", self.out)
                old.rmdir()
            raise
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_parents()

    def _remove_parents(self) -> None:
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()


# ------------------------------------------------------------------------------------------
@app.command()
def prune(
    model: str = typer.Argument(DEFAULT_MODEL, help="torchvision:NAME, path/to/file.py:factory, "
                                "package.module:factory, or a whole model saved as .pt"),
    ratio: float = typer.Option(0.5, help="fraction of channels to remove per group"),
    importance: str = typer.Option("l2", help="l1, l2 or random"),
    global_pruning: bool = typer.Option(False, "--global", help="rank channels across groups"),
    round_to: int = typer.Option(8, help="keep widths a multiple of N (8 suits ONNX Runtime on x86; 1 = no rounding)"),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="module name never pruned (repeat, or comma-separated)"),
    input_shape: str = typer.Option(DEFAULT_SHAPE, help="example input shape, e.g. 1,3,224,224 (';' between inputs)"),
    out: Optional[Path] = typer.Option(None, help="output folder [default: passes-out/<model-name>]"),
    no_bench: bool = typer.Option(False, "--no-bench", help="skip the ONNX Runtime benchmark"),
    runs: int = typer.Option(50, min=1, help="timed benchmark rounds"),
    seed: int = typer.Option(0, help="seed for model init, example inputs and random importance"),
    part: Optional[str] = typer.Option(None, help="prune only this submodule (qualified name), for a model "
                                       "torch.fx cannot trace whole, e.g. a detector's backbone; the "
                                       "ONNX files, benchmark and report are then the part's"),
    list_input: bool = typer.Option(False, "--list-input", help="call the model with one list of the "
                                    "example tensors, as torchvision detectors take [image] (with --part)"),
) -> None:
    """Prune MODEL, verify it, export original and pruned ONNX, benchmark both, write a report.

    With --part, the whole model runs once on the example inputs, the submodule is pruned and
    verified on the tensors it receives, the whole model is run again with the pruned part,
    and the original and pruned part are exported and benchmarked on those tensors."""
    from .api import check_whole, prune as prune_model
    from .bench import benchmark
    from .export import export_onnx
    from .report import build_report, rich_table, to_markdown
    from .trace import part_inputs
    from .verify import verify as verify_model

    console, err = _consoles()
    timings: dict[str, float] = {}
    ignored = [n.strip() for item in (ignore or []) for n in item.split(",") if n.strip()]
    with _user_errors(err):
        shapes, inputs = _inputs(input_shape, seed, part, list_input)
        import torch

        torch.manual_seed(seed)
        with _step(err, "load model", timings):
            loaded = load_model(model)
            check_runs(loaded.model, inputs, shapes, list_input)
        out = out if out is not None else Path("passes-out") / loaded.name
        settings = dict(ratio=ratio, importance=importance, global_pruning=global_pruning,
                        round_to=round_to, ignored_layers=ignored, seed=seed,
                        **({"part": part} if part else {}))
        command = shlex.join(["passes", "prune", model, "--ratio", f"{ratio:g}", "--importance", importance,
                              *(["--global"] if global_pruning else []), "--round-to", str(round_to),
                              *(a for n in ignored for a in ("--ignore", n)), "--input-shape",
                              format_shapes(shapes), *(["--part", part] if part else []),
                              *(["--list-input"] if list_input else []), "--out", str(out),
                              *(["--no-bench"] if no_bench else ["--runs", str(runs)]), "--seed", str(seed)])
        stage = Staging(out)
        try:
            with _step(err, "trace + prune" if part is None else f"trace + prune part {part!r}", timings):
                result = prune_model(loaded.model, inputs, ratio=ratio, importance=importance,
                                   global_pruning=global_pruning, round_to=round_to,
                                   ignored_layers=ignored, seed=seed, verify=False, part=part)
            with _step(err, "verify", timings):
                result.report.verify = verify_model(loaded.model, result, inputs)
                if not result.report.verify.ok:
                    raise VerificationError(result.report.verify.message, result.report.verify)
                if part is not None:  # prune ran the whole model with the part only when verifying
                    check_whole(result.model, inputs, part, result.report.verify)
            with _step(err, "save pruned.pt + plan.json", timings):
                try:
                    torch.save(result.model, stage.tmp / "pruned.pt")
                    result.plan.save(stage.tmp / "plan.json")
                except Exception as e:  # noqa: BLE001 - pickling errors come in many types
                    raise SaveError(f"cannot save the pruned model with torch.save: {type(e).__name__}: "
                                    f"{e}; keep lambdas and locally defined classes out of the model's "
                                    f"modules and attributes") from e
            original, pruned, onnx_inputs = loaded.model, result.model, inputs
            if part is not None:  # the part's tensors: what the whole model hands it
                original, onnx_inputs = part_inputs(loaded.model, part, inputs)
                pruned = result.model.get_submodule(part)
            exports = {}
            for key, module in (("original", original), ("pruned", pruned)):
                with _step(err, f"export {key}.onnx", timings):
                    exports[key] = export_onnx(module, onnx_inputs, stage.tmp / f"{key}.onnx")
            bench = None
            if not no_bench:
                with _step(err, f"benchmark ({runs} interleaved runs)", timings):
                    bench = benchmark([exports["original"], exports["pruned"]], onnx_inputs, runs=runs,
                                      names=["original", "pruned"])
            report = build_report(model=loaded.name, spec=loaded.spec, input_shapes=shapes,
                                  settings=settings, command=command, result=result,
                                  exports=exports, bench=bench, timings=timings,
                                  part_input_shapes=[tuple(t.shape) for t in onnx_inputs] if part else None)
            (stage.tmp / "report.json").write_text(json.dumps(report, indent=1))
            (stage.tmp / "report.md").write_text(to_markdown(report))
            stage.commit()
        finally:
            stage.cleanup()
    console.print(rich_table(report))
    console.print(f"wrote {out}/: {', '.join(OUTPUT_FILES)}", soft_wrap=True, markup=False)


@app.command()
def bench(
    files: List[Path] = typer.Argument(..., help="ONNX files; the first is the baseline"),
    input_shape: Optional[str] = typer.Option(None, help="input shape [default: the first file's, batch 1]"),
    runs: int = typer.Option(50, min=1, help="timed rounds (one call per model each)"),
    warmup: int = typer.Option(10, min=0, help="untimed calls per model first"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads [default: cpu count]"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
    seed: int = typer.Option(0, help="seed for the random inputs"),
) -> None:
    """Interleaved ONNX Runtime latency of several .onnx files in one process."""
    from .bench import benchmark

    console, err = _consoles()
    with _user_errors(err):
        for f in files:
            _check_onnx(f)
        shapes = parse_shapes(input_shape) if input_shape else _onnx_shapes(files[0])
        inputs = make_inputs(shapes, seed)
        with err.status(f"benchmarking {len(files)} models ({runs} interleaved runs) ..."):
            try:
                report = benchmark(files, inputs, runs=runs, warmup=warmup, threads=threads)
            except PassesError:
                raise
            except Exception as e:  # ONNX Runtime's own error types
                if not type(e).__module__.startswith("onnxruntime"):
                    raise
                raise UsageError(f"ONNX Runtime failed on inputs {format_shapes(shapes)}: "
                                 f"{type(e).__name__}: {e}; pass the model's input shape with --input-shape") from e
        if json_path is not None:
            try:
                json_path.write_text(json.dumps(report.to_dict(), indent=1))
            except OSError as e:
                raise OutputError(f"cannot write --json {str(json_path)!r} ({e.strerror or e}); "
                                  f"pass a writable path") from e
    console.print(report.rich_table())


def _check_onnx(path: Path) -> None:
    import onnx

    if not path.is_file():
        raise UsageError(f"no ONNX file at {str(path)!r}; pass existing .onnx files")
    try:
        onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise UsageError(f"{str(path)!r} is not an ONNX model ({type(e).__name__}); pass .onnx files "
                         f"such as the ones `passes prune` writes") from e


def _onnx_shapes(path: Path) -> list[tuple[int, ...]]:
    import onnx

    shapes = []
    for i in onnx.load(path, load_external_data=False).graph.input:
        t = i.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT:
            raise UsageError(f"{path.name} input {i.name!r} is not float32; benchmark models "
                             f"with float inputs only")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims[1:]):
            raise UsageError(f"{path.name} input {i.name!r} has symbolic dims beyond the batch "
                             f"({[d.dim_param or d.dim_value for d in t.shape.dim]}); pass --input-shape")
        shapes.append(tuple([dims[0] or 1] + dims[1:]) if dims else ())
    return shapes


@app.command()
def inspect(
    model: str = typer.Argument(..., help="torchvision:NAME, path/to/file.py:factory, package.module:factory or .pt"),
    input_shape: str = typer.Option(DEFAULT_SHAPE, help="example input shape, e.g. 1,3,224,224"),
    seed: int = typer.Option(0, help="seed for model init and example inputs"),
    part: Optional[str] = typer.Option(None, help="analyse only this submodule, on the tensors it receives"),
    list_input: bool = typer.Option(False, "--list-input", help="call the model with one list of the "
                                    "example tensors, as torchvision detectors take [image] (with --part)"),
) -> None:
    """Channel analysis without pruning: groups, pinned channels with reasons, layer widths."""
    from .api import analyze

    console, err = _consoles()
    with _user_errors(err):
        shapes, inputs = _inputs(input_shape, seed, part, list_input)
        import torch

        torch.manual_seed(seed)
        loaded = load_model(model)
        check_runs(loaded.model, inputs, shapes, list_input)
        with err.status("tracing and analysing ..."):
            cg = analyze(loaded.model, inputs, part=part)
    subject = loaded.name + (f" part {part!r}" if part else "")
    console.print(f"{subject}: {len(cg.units)} pruning units in {len(cg.groups)} groups; "
                  f"{len(cg.pinned_roots)} channel classes pinned", soft_wrap=True, markup=False)
    groups = Table(title="groups (channels pruned together share a group)")
    for h in ("group", "units", "producing parameters"):
        groups.add_column(h, justify="right" if h != "producing parameters" else "left")
    for g in cg.groups:
        groups.add_row(str(g.id), str(g.size), ", ".join(g.producers))
    pinned = Table(title="pinned channels (never removed)")
    for h in ("channels", "node", "reason"):
        pinned.add_column(h, justify="right" if h == "channels" else "left")
    for p in cg.pinned():
        pinned.add_row(str(p.channels), p.node, p.reason)
    widths = Table(title="layer widths (weight shapes)")
    for h in ("layer", "kind", "shape"):
        widths.add_column(h)
    root = loaded.model.get_submodule(part) if part else loaded.model
    for name, module in root.named_modules(prefix=part or ""):
        w = getattr(module, "in_proj_weight", None)
        w = w if w is not None else getattr(module, "weight", None)
        if hasattr(w, "shape"):
            widths.add_row(name, type(module).__name__, str(tuple(w.shape)))
    for table in (groups, pinned, widths):
        console.print(table)


if __name__ == "__main__":
    app()

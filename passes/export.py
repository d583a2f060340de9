"""ONNX export with a deployment check: exporter, ONNX checker, shape inference, ORT parity.

`export_onnx(model, example_inputs, path)` puts the model in eval mode (restoring every
submodule's own training flag afterwards), exports it with `torch.onnx.export`, runs
`onnx.checker.check_model(full_check=True)`, writes inferred shapes into the file with
`onnx.shape_inference.infer_shapes_path` (strict), and runs the file in ONNX Runtime on the
example inputs against torch. With `dynamic_batch=True` dim 0 of every input and output is
named "batch" and parity is also checked at twice the example batch: a file whose batch dim
is only nominally dynamic fails here instead of in deployment.

Exporter choice, measured with torch 2.14.1 on torchvision resnet18, a symbolic_trace'd
resnet18, mobilenet_v3_small, convnext_tiny, swin_t and vit_b_16 (1x3x224x224 example, dynamic
batch, ORT parity at batch 1 and 2). The legacy TorchScript exporter (`dynamo=False`) exports
all six correctly and 3-8x faster (bare export: resnet18 1.4 s vs 5.1 s, swin_t 4.2 s vs 32 s).
The torch.export-based exporter (`dynamo=True`) exports all six, but from a batch-1 example it
silently bakes batch 1 into vit_b_16's attention reshapes (the file fails in ORT at batch 2),
and given `dynamic_shapes` with a named Dim it refuses convnext_tiny and swin_t ("Invalid
ranges [2:1]"), so both exporters get `dynamic_axes`. The TorchScript exporter goes first, the
dynamo exporter is the fallback when it raises. The TorchScript exporter is deprecated
upstream; that warning (and the dynamo exporter's about `dynamic_axes`) is silenced here.
Export runs with grad mode on: under `torch.no_grad()` nn.MultiheadAttention takes its fused
fast path, which the TorchScript exporter cannot export (vit_b_16 then fell to dynamo).

Everything is written to a temporary folder next to `path` and moved into place only after
every check passed (external data files first, the .onnx file last, each by `os.replace`), so
a failure never leaves a new file at `path`. A file already at `path` is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn
from torch.utils._pytree import tree_leaves

from passes.errors import ExportError, InputError, ParityError

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

EXPORTERS = {"torchscript": False, "dynamo": True}  # tried in this order; value: dynamo=

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ATEN_OP = re.compile(r"aten(?:::|\.)\w+")
# Warnings about choices made here on purpose, not actionable by the caller.
_QUIET = (r"You are using the legacy TorchScript-based ONNX export",
          r"The feature will be removed",
          r"# 'dynamic_axes' is not recommended when dynamo=True",
          r"from_dynamic_axes_to_dynamic_shapes is deprecated")
_HINT = ("hint: the op may have no ONNX mapping at this opset or the forward may not trace; "
         "try another opset, replace the op, or run torch.export.export(model, inputs) to see "
         "where tracing stops")


@dataclass(frozen=True)
class ExportResult:
    """A checked ONNX file; usable wherever a path is (`os.fspath(result)`)."""

    path: Path
    opset: int
    file_bytes: int
    max_abs_error: float
    max_rel_error: float
    exporter: str

    def __fspath__(self) -> str:
        return os.fspath(self.path)


@dataclass(frozen=True)
class OnnxFile:
    """What an .onnx file holds: default-domain opset, bytes (with external data), parameters."""

    opset: int
    file_bytes: int
    params: int

    @classmethod
    def read(cls, path: Path) -> OnnxFile:
        model = onnx.load(path, load_external_data=False)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        external = {ExternalDataInfo(t).location for t in model.graph.initializer
                    if uses_external_data(t)}
        file_bytes = path.stat().st_size + sum((path.parent / f).stat().st_size for f in external)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        return cls(opset, file_bytes, params)


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True,
                atol: float = 1e-4, rtol: float = 1e-3) -> ExportResult:
    """Export `model` to `path`, check the file and its ONNX Runtime parity with torch.

    Raises ExportError (exporter, checker, shape inference or ONNX Runtime failed), ParityError
    (an output differs by more than atol + rtol * max|torch output|) or InputError.
    """
    inputs = as_input_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with evaluating(model):  # grad mode stays on for the export: see the module docstring
        reference = torch_outputs(model, inputs)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
            staged = Path(tmp) / path.name
            exporter = _export(model, inputs, reference, staged, opset, dynamic_batch)
            _check(staged)
            max_abs, max_rel = _parity(model, inputs, reference, staged, dynamic_batch, atol, rtol)
            _publish(staged, path)
    info = OnnxFile.read(path)
    return ExportResult(path, info.opset, info.file_bytes, max_abs, max_rel, exporter)


def as_input_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """A tensor or a sequence of tensors -> a non-empty tuple of tensors, else InputError."""
    single = isinstance(example_inputs, torch.Tensor)
    inputs = (example_inputs,) if single else tuple(example_inputs)
    bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor)]
    if not inputs or bad:
        raise InputError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                         f"got {bad or 'nothing'}")
    return inputs


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block; afterwards every submodule gets its own training flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def torch_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The model's output tensors (no grad), nested tuples/lists/dicts flattened in order."""
    with torch.no_grad():
        outputs = model(*inputs)
    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: list[torch.Tensor],
            file: Path, opset: int | None, dynamic_batch: bool) -> str:
    """Try each exporter in order; return the name of the first that succeeds."""
    input_names, output_names = _names("input", inputs), _names("output", reference)
    named = zip(input_names + output_names, [*inputs, *reference])
    dynamic_axes = {n: {0: "batch"} for n, t in named if t.dim() > 0} if dynamic_batch else None
    failures = []
    for name, dynamo in EXPORTERS.items():
        try:
            with warnings.catch_warnings():
                for message in _QUIET:
                    warnings.filterwarnings("ignore", message)
                torch.onnx.export(model, inputs, file, dynamo=dynamo, verbose=False,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset)
            return name
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported below
            failures.append(f"{name} exporter: {_describe(exc)}")
    at_opset = f" at opset {opset}" if opset is not None else ""
    raise ExportError(f"could not export {type(model).__name__} to ONNX{at_opset}: "
                      f"{'; '.join(failures)}; {_HINT}")


def _names(prefix: str, tensors: Sequence[torch.Tensor]) -> list[str]:
    return [f"{prefix}{i}" for i in range(len(tensors))]


def _describe(exc: BaseException) -> str:
    """One line: the root cause's type and first line, plus the first aten op named anywhere."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    lines = _ANSI.sub("", str(root)).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}"
    op = next((m.group() for e in chain for m in [_ATEN_OP.search(str(e))] if m), None)
    return f"{text} (op {op})" if op and op not in text else text


def _check(file: Path) -> None:
    """ONNX checker (full) and strict shape inference, whose shapes are written into the file."""
    try:
        onnx.checker.check_model(file, full_check=True)
        onnx.shape_inference.infer_shapes_path(file, file, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise ExportError(f"{file.name}: ONNX check failed: {_describe(exc)}") from exc


def _parity(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: list[torch.Tensor],
            file: Path, dynamic_batch: bool, atol: float, rtol: float) -> tuple[float, float]:
    """Max abs and rel error of ONNX Runtime vs torch; at twice the batch too if it is dynamic."""
    session = _session(file)
    cases = [(inputs, reference, "")]
    if dynamic_batch:
        doubled = tuple(torch.cat([t, t]) if t.dim() > 0 else t for t in inputs)
        cases.append((doubled, torch_outputs(model, doubled), " at twice the example batch"))
    errors = [_compare(_run(session, file, x, where), expected, atol, rtol, file, where)
              for x, expected, where in cases]
    return max(e[0] for e in errors), max(e[1] for e in errors)


def _session(file: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(file, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind error types
        message = f"{file.name}: ONNX Runtime cannot load the file: {_describe(exc)}"
        raise ExportError(message) from exc


def _run(session: ort.InferenceSession, file: Path, inputs: tuple[torch.Tensor, ...],
         where: str) -> list[np.ndarray]:
    """Run the session; exporters may drop unused inputs, so feed by the names that remain."""
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: t.numpy() for n, t in zip(_names("input", inputs), inputs) if n in wanted}
    try:
        return session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind error types
        hint = "; export with a batch > 1 example or dynamic_batch=False" if where else ""
        message = f"{file.name}: ONNX Runtime failed{where}: {_describe(exc)}{hint}"
        raise ExportError(message) from exc


def _compare(got: list[np.ndarray], expected: list[torch.Tensor], atol: float, rtol: float,
             file: Path, where: str) -> tuple[float, float]:
    """Max abs and rel error (max|a-b| / (max|b| + 1e-12)) over outputs; raise past tolerance."""
    if len(got) != len(expected):
        raise ParityError(f"{file.name}: ONNX Runtime gives {len(got)} outputs{where}, "
                          f"torch {len(expected)}")
    worst_abs = worst_rel = 0.0
    for i, (a, b) in enumerate(zip(got, expected)):
        a, b = np.asarray(a, dtype=np.float64), b.numpy().astype(np.float64)
        if a.shape != b.shape:
            raise ParityError(f"{file.name}: output{i}{where} has shape {a.shape} in ONNX Runtime, "
                              f"{b.shape} in torch")
        scale = float(np.abs(b).max(initial=0.0))
        err = float(np.abs(a - b).max(initial=0.0))
        rel = err / (scale + 1e-12)
        if not err <= atol + rtol * scale:  # written so that NaN fails
            raise ParityError(f"{file.name}: output{i}{where}: max abs error {err:.3g} > "
                              f"atol + rtol * max|torch| = {atol:g} + {rtol:g} * {scale:.3g} "
                              f"(max rel error {rel:.3g})")
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
    return worst_abs, worst_rel


def _publish(staged: Path, path: Path) -> None:
    """Move external data files, then the .onnx file, from the staging folder to `path`'s folder."""
    for extra in staged.parent.iterdir():
        if extra != staged:
            os.replace(extra, path.parent / extra.name)
    os.replace(staged, path)

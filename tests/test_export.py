"""ONNX export (checker, ORT parity, dynamic batch, atomic write) and the ORT benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from rich.table import Table
from torch import nn

from passes.bench import benchmark
from passes.errors import ExportError, InputError, ParityError
from passes.export import export_onnx


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class RaisesWhileExporting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            raise RuntimeError("boom during export")
        return x * 2


class DiffersWhenExported(nn.Module):
    """Eager forward and exported graph disagree by 0.5 everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 if torch.onnx.is_in_onnx_export() else x


class NestedOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x * 2, {"sum": x.sum(dim=1), "max": x.amax(dim=1)}


class Unsupported(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[1]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return TinyNet()
    if name == "fx_tiny":
        return torch.fx.symbolic_trace(TinyNet())
    return getattr(torchvision.models, name)()


def _ort(path: os.PathLike, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input0": x.numpy()})[0]


@pytest.mark.parametrize("name", ["tiny", "fx_tiny", "resnet18", "mobilenet_v3_small"])
def test_export_matches_torch_at_two_batch_sizes(name: str, tmp_path) -> None:
    model = _model(name)
    model.train()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)

    result = export_onnx(model, x, tmp_path / f"{name}.onnx")

    assert result.path == tmp_path / f"{name}.onnx" and os.fspath(result) == str(result.path)
    assert result.path.is_file() and result.file_bytes == result.path.stat().st_size
    assert result.exporter == "torchscript" and result.opset >= 17
    proto = onnx.load(result.path)
    assert [i.name for i in proto.graph.input] == ["input0"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(proto.graph.value_info) > 0  # shape inference was written into the file
    assert 0.0 <= result.max_abs_error < 1e-4 and 0.0 <= result.max_rel_error < 1e-3
    assert model.training and all(m.training for m in model.modules())

    x2 = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x2).numpy()
    np.testing.assert_allclose(_ort(result, x2), expected, rtol=1e-3, atol=1e-4)


def test_mixed_training_flags_are_restored(tmp_path) -> None:
    model = _model("tiny").train()
    model.bn.eval()
    export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert (model.training, model.conv.training, model.bn.training) == (True, True, False)


def test_nested_outputs_are_flattened_in_order(tmp_path) -> None:
    x = torch.randn(3, 4)
    result = export_onnx(NestedOutputs(), x, tmp_path / "m.onnx")
    session = ort.InferenceSession(os.fspath(result), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output0", "output1", "output2"]
    got = session.run(None, {"input0": x.numpy()})
    for a, b in zip(got, [x * 2, x.sum(dim=1), x.amax(dim=1)], strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6)


def test_static_batch_when_asked(tmp_path) -> None:
    result = export_onnx(_model("tiny"), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx",
                         dynamic_batch=False)
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 16, 16]


def test_failed_export_raises_and_leaves_no_file(tmp_path) -> None:
    model = RaisesWhileExporting().train()
    with pytest.raises(ExportError, match=r"RaisesWhileExporting.*boom during export.*hint"):
        export_onnx(model, torch.randn(1, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [] and model.training


def test_exporter_crash_after_partial_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    calls = []

    def half_written(model, args, f, *, dynamo, **kwargs):
        calls.append(dynamo)
        Path(f).write_bytes(b"\x08\x07 not a model")
        raise RuntimeError(f"disk full ({'dynamo' if dynamo else 'torchscript'})")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    expected = r"torchscript exporter: RuntimeError: disk full.*dynamo exporter"
    with pytest.raises(ExportError, match=expected):
        export_onnx(_model("tiny"), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert calls == [False, True]  # TorchScript first, dynamo as the fallback
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_dynamo_exporter(tmp_path, monkeypatch) -> None:
    real_export = torch.onnx.export

    def torchscript_broken(model, args, f, *, dynamo, **kwargs):
        if not dynamo:
            raise RuntimeError("torchscript exporter unavailable")
        return real_export(model, args, f, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torchscript_broken)
    result = export_onnx(_model("tiny"), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert result.exporter == "dynamo" and result.max_rel_error < 1e-3
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"


def test_unsupported_op_is_named(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"Unsupported.*aten::linalg_svd"):
        export_onnx(Unsupported(), torch.randn(2, 4, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_raises_and_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(ParityError, match=r"output0: max abs error 0\.5 > atol"):
        export_onnx(DiffersWhenExported(), torch.ones(1, 4), path)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_earlier_file(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"earlier result")
    with pytest.raises(ParityError):
        export_onnx(DiffersWhenExported(), torch.ones(1, 4), path)
    assert path.read_bytes() == b"earlier result" and list(tmp_path.iterdir()) == [path]


def test_non_tensor_inputs_are_rejected(tmp_path) -> None:
    with pytest.raises(InputError, match="tensor"):
        export_onnx(_model("tiny"), (torch.randn(1, 3, 8, 8), 3), tmp_path / "m.onnx")


def _wider_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_benchmark_two_models(tmp_path) -> None:
    x = torch.randn(1, 3, 16, 16)
    onnx_file = export_onnx(_wider_net(), x, tmp_path / "wide.onnx")
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

    report = benchmark([onnx_file, small], x, threads=1, warmup=1, runs=3)

    first, second = report.rows
    assert (first.name, first.path) == ("wide", os.fspath(onnx_file))
    assert (second.name, second.path) == ("Sequential", None)
    assert first.ratio_to_first == 1.0 and second.ratio_to_first > 0
    assert all(0 < r.p50_ms <= r.p90_ms for r in report.rows)
    assert first.params == 3 * 16 * 9 + 16 + 16 * 16 * 9 + 16 and first.macs is None
    assert second.params == 3 * 8 * 9 + 8 and second.macs == 16 * 16 * 8 * 3 * 9
    assert (report.machine.threads, report.machine.runs, report.machine.warmup) == (1, 3, 1)
    assert json.loads(json.dumps(report.to_dict()))["rows"][1]["macs"] == 16 * 16 * 8 * 3 * 9
    lines = report.to_markdown().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | p50 ms")
    assert lines[2].startswith("| wide |") and lines[3].startswith("| Sequential |")
    table = report.rich_table()
    assert isinstance(table, Table) and table.row_count == 2


def test_benchmark_rejects_bad_arguments(tmp_path) -> None:
    missing = tmp_path / "missing.onnx"
    with pytest.raises(InputError, match="missing.onnx"):
        benchmark([missing], torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="runs"):
        benchmark([nn.ReLU()], torch.randn(1, 3), runs=0)
    with pytest.raises(InputError, match="2 names for 1 models"):
        benchmark([nn.ReLU()], torch.randn(1, 3), names=["a", "b"])

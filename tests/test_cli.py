"""The `passes` command line (in process, typer's CliRunner) and ORT parity of pruned models."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import passes
from models import MHA, MnistNet
from passes.cli import OUTPUT_FILES, app
from passes.models import ModelSpecError, ShapeError, load_model, parse_shapes

MODELS_PY = str(Path(__file__).with_name("models.py"))
MNIST = [f"{MODELS_PY}:MnistNet", "--input-shape", "1,1,28,28"]

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
            if exporting and self.mode == "differs":
                return self.fc(y) + 0.5
            if exporting and self.mode == "raises":
                raise RuntimeError("boom during export")
            return self.fc(y)

    def make(mode="ok"):
        torch.manual_seed(0)
        model = Small()
        model.mode = mode
        return model

    def differs():
        return make("differs")

    def raises():
        return make("raises")

    def needs_arg(width):
        return make()

    class Listed(nn.Module):  # called with a list of images, as detectors are: fx cannot trace it whole

        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.Conv2d(16, 8, 3, padding=1))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, images):
            x = torch.stack([im * 2 - 1 for im in images])
            return self.head(self.backbone(x))

    def listed():
        torch.manual_seed(0)
        return Listed()
""")


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    """One full `passes prune` run (with a short benchmark) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("prune") / "mnist"
    result = run("prune", *MNIST, "--runs", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "metric" in result.stdout and "ORT p50 ms" in result.stdout
    return out


@pytest.fixture
def factories(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def test_prune_writes_the_six_files_and_nothing_else(pruned_dir: Path) -> None:
    assert sorted(p.name for p in pruned_dir.iterdir()) == sorted(OUTPUT_FILES)
    assert [p.name for p in pruned_dir.parent.iterdir()] == ["mnist"]  # no staging folder left


def test_report_json_is_complete_and_consistent(pruned_dir: Path) -> None:
    r = json.loads((pruned_dir / "report.json").read_text())
    assert r["params_after"] < r["params_before"] and r["macs_after"] < r["macs_before"]
    assert r["onnx_bytes_after"] < r["onnx_bytes_before"]
    assert r["onnx_bytes_after"] == (pruned_dir / "pruned.onnx").stat().st_size
    for key in ("ort_p50_ms_before", "ort_p50_ms_after", "latency_speedup", "mac_reduction",
                "speedup_over_mac_reduction"):
        assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key]), key
    assert r["latency_speedup"] == pytest.approx(r["ort_p50_ms_before"] / r["ort_p50_ms_after"])
    assert r["mac_reduction"] == pytest.approx(r["macs_before"] / r["macs_after"])
    assert r["speedup_over_mac_reduction"] == pytest.approx(r["latency_speedup"] / r["mac_reduction"])
    assert r["verdict"] == "masked-equivalent" and r["verify"]["ok"] and r["verify"]["exact"]
    assert r["verify"]["max_rel_error"] <= 1e-4
    for key in ("original", "pruned"):
        assert 0 <= r["parity"][key]["max_abs_error"] < 1e-4
    assert r["bench"]["runs"] == 3 and [row["name"] for row in r["bench"]["rows"]] == ["original", "pruned"]
    assert r["command"].startswith("passes prune ") and "--input-shape 1,1,28,28" in r["command"]
    assert set(r["machine"]) >= {"platform", "cpu", "cpu_count", "torch", "onnxruntime"}
    layers = {l["name"]: l for l in r["layers"]}
    assert layers["conv1"]["before"] == [10, 1, 5, 5] and layers["conv1"]["after"][0] < 10
    assert layers["fc2"]["after"][0] == 10  # the output stays
    assert any(p["reason"] == "model output" and p["channels"] == 10 for p in r["pinned"])
    md = (pruned_dir / "report.md").read_text()
    assert "| metric | original | pruned | ratio |" in md and r["command"] in md
    assert "masked-equivalent" in md and "model output" in md


def test_pruned_pt_loads_and_matches_pruned_onnx(pruned_dir: Path) -> None:
    model = torch.load(pruned_dir / "pruned.pt", weights_only=False)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    session = ort.InferenceSession(str(pruned_dir / "pruned.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input0": x.numpy()})[0], y.numpy(), atol=1e-5)


def test_plan_json_reapplies_to_a_fresh_model(pruned_dir: Path) -> None:
    pruned = torch.load(pruned_dir / "pruned.pt", weights_only=False)
    x = torch.randn(1, 1, 28, 28)
    again = passes.apply_plan(MnistNet(), passes.Plan.load(pruned_dir / "plan.json"), x)
    assert {k: v.shape for k, v in again.model.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    again.model.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), pruned(x))


def test_bench_two_onnx_files(pruned_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run("bench", str(pruned_dir / "original.onnx"), str(pruned_dir / "pruned.onnx"),
                 "--runs", "3", "--warmup", "1", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "original" in result.stdout and "pruned" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["original", "pruned"] and rows[0]["ratio_to_first"] == 1.0
    assert all(r["p50_ms"] > 0 for r in rows) and rows[1]["params"] < rows[0]["params"]


def test_inspect_shows_groups_pins_and_widths() -> None:
    result = run("inspect", *MNIST)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "model output" in text and "producing parameters" in text
    assert "conv1.weight[0]" in text and "(10, 1, 5, 5)" in text


def test_torchvision_model_and_default_out(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--no-bench")
    assert result.exit_code == 0, result.output
    out = tmp_path / "passes-out" / "resnet18"
    r = json.loads((out / "report.json").read_text())
    assert r["latency_speedup"] is None and r["speedup_over_mac_reduction"] is None
    assert r["verdict"] == "masked-equivalent" and r["settings"]["round_to"] == 8
    assert all(l["after"][0] % 8 == 0 and l["after"][0] < l["before"][0]
               for l in r["layers"] if l["kind"] == "Conv2d")


def test_torchvision_models_with_a_backbone_download_nothing(monkeypatch) -> None:
    """Segmentation builders default to ImageNet backbone weights (a download, which this
    machine cannot make): `torchvision:NAME` builds them untrained, as every other model."""
    import torch.hub

    from passes.models import torchvision_model

    def no_network(*a, **k):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    model = torchvision_model("lraspp_mobilenet_v3_large")
    assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 21, 32, 32)


def test_rerun_replaces_the_previous_result(factories: Path, tmp_path) -> None:
    args = ("prune", f"{factories}:make", "--input-shape", "1,3,8,8", "--no-bench", "--round-to", "1")
    assert run(*args).exit_code == 0
    out = tmp_path / "passes-out" / "make"
    first = json.loads((out / "report.json").read_text())
    (out / "report.md").write_text("stale")
    result = run(*args, "--ratio", "0.25")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["params_after"] > first["params_after"]
    assert (out / "report.md").read_text() != "stale"
    assert sorted(p.name for p in (tmp_path / "passes-out").iterdir()) == ["make"]


BAD = [  # (args after `prune`, exit code, text the one-line error must contain)
    (["torchvision:nope"], 2, "'nope'"),
    (["missing_file.py:make"], 2, "missing_file.py"),
    (["{factories}:Nope"], 2, "'Nope'"),
    (["{factories}:needs_arg"], 2, "needs_arg"),
    (["no_such_package.mod:make"], 2, "no_such_package"),
    (["{factories}:make", "--input-shape", "1,5,8,8"], 2, "1,5,8,8"),
    (["{factories}:make", "--input-shape", "1,3,8x"], 2, "1,3,8x"),
    (["{factories}:make", "--ratio", "1.5"], 2, "1.5"),
    (["{factories}:make", "--ignore", "nolayer"], 2, "nolayer"),
    (["{factories}:make", "--out", "{file}/out"], 2, "not a directory"),
    (["{factories}:listed", "--list-input", "--input-shape", "3,8,8"], 2, "--part"),
    (["{factories}:listed", "--list-input", "--input-shape", "3,8,8", "--part", "backbne"], 2, "'backbone'"),
    (["{factories}:listed", "--input-shape", "3,8,8", "--part", "backbone"], 2, "--list-input"),
    (["{factories}:raises"], 1, "boom during export"),
    (["{factories}:differs"], 1, "max abs error 0.5"),
]


@pytest.mark.parametrize("args,code,needle", BAD, ids=[" ".join(a)[:40] for a, _, _ in BAD])
def test_bad_input_gives_one_line_and_no_output(args, code, needle, factories: Path, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = [a.format(factories=factories, file=blocker) for a in args]
    if "--input-shape" not in args:
        args += ["--input-shape", "1,3,8,8"]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["prune", *args, "--runs", "2"])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert needle.lower() in errors[0].lower() and "; " in errors[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "factories.py"]  # nothing else


def test_part_of_a_model_called_with_a_list(factories: Path, tmp_path) -> None:
    """--part with --list-input: the backbone is pruned on what the model hands it (its images
    stacked), the whole model is saved, and the ONNX files and report are the part's."""
    out = tmp_path / "out"
    result = run("prune", f"{factories}:listed", "--part", "backbone", "--list-input", "--input-shape", "3,8,8",
                 "--runs", "2", "--round-to", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    r = json.loads((out / "report.json").read_text())
    assert r["part"] == "backbone" and r["part_input_shapes"] == [[1, 3, 8, 8]] and r["input_shapes"] == [[3, 8, 8]]
    assert r["settings"]["part"] == "backbone" and "--part backbone --list-input" in r["command"]
    assert r["verdict"] == "masked-equivalent"
    assert r["params_before"] == 3 * 16 * 9 + 16 + 2 * 16 + 16 * 8 * 9 + 8  # the backbone's alone
    assert r["params_after"] < r["params_before"]
    assert "Only the submodule `backbone` was pruned" in (out / "report.md").read_text()
    model = torch.load(out / "pruned.pt", weights_only=False)  # the whole model
    assert type(model).__name__ == "Listed" and model.head.in_channels == 8
    images = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    with torch.no_grad():
        y = model(images)
        x = torch.stack([im * 2 - 1 for im in images])
        feats = model.backbone(x)
    assert y.shape == (2, 4, 8, 8)
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape[1:] for i in session.get_inputs()] == [[3, 8, 8]]  # the backbone's input
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], feats.numpy(),
                               atol=1e-5)
    plan = passes.Plan.load(out / "plan.json")
    assert plan.settings["part"] == "backbone"
    inspected = run("inspect", f"{factories}:listed", "--part", "backbone", "--list-input", "--input-shape", "3,8,8")
    assert inspected.exit_code == 0, inspected.output
    assert "listed part 'backbone'" in inspected.stdout and "backbone.0" in inspected.stdout
    assert "head" not in inspected.stdout


def test_failed_run_keeps_the_previous_result(factories: Path, tmp_path) -> None:
    out = tmp_path / "out"
    assert run("prune", f"{factories}:make", "--input-shape", "1,3,8,8", "--no-bench", "--out", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("prune", f"{factories}:differs", "--input-shape", "1,3,8,8", "--no-bench", "--out", str(out))
    assert result.exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factories.py", "out"]


def test_refuses_to_replace_a_foreign_folder(factories: Path, tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = run("prune", f"{factories}:make", "--input-shape", "1,3,8,8", "--out", str(tmp_path / "mine"))
    assert result.exit_code == 2 and "refusing to replace" in result.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_bench_bad_files(pruned_dir: Path, tmp_path) -> None:
    result = run("bench", str(tmp_path / "missing.onnx"))
    assert result.exit_code == 2 and "missing.onnx" in result.stderr
    result = run("bench", str(pruned_dir / "report.md"))
    assert result.exit_code == 2 and "not an ONNX model" in result.stderr
    result = run("bench", str(pruned_dir / "pruned.onnx"), "--input-shape", "1,3,28,28", "--runs", "1")
    assert result.exit_code == 2 and "--input-shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_model_specs(tmp_path) -> None:
    assert type(load_model("models:MnistNet").model).__name__ == "MnistNet"  # package.module:factory
    assert load_model("models:MnistNet").name == "MnistNet"
    torch.save(MnistNet(), tmp_path / "whole.pt")
    loaded = load_model(str(tmp_path / "whole.pt"))
    assert isinstance(loaded.model, MnistNet) and loaded.name == "whole" and not loaded.model.training
    torch.save(MnistNet().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelSpecError, match="state_dict"):
        load_model(str(tmp_path / "weights.pt"))
    with pytest.raises(ModelSpecError, match="no factory"):
        load_model(f"{MODELS_PY}")


def test_parse_shapes() -> None:
    assert parse_shapes("1,3,224,224") == [(1, 3, 224, 224)]
    assert parse_shapes(" 2, 4 ; 1,2,8 ") == [(2, 4), (1, 2, 8)]
    for bad in ("", "1,,3", "1,-3", "a,b", "1,0,4", "100000,100000,100000"):
        with pytest.raises(ShapeError):
            parse_shapes(bad)


# ------------------------------------------------------------------------------------------
# ORT parity of pruned models (export parity of unpruned torchvision models is in test_export)

def _pruned_parity_cases():
    yield "resnet18", lambda: torchvision.models.resnet18(), (1, 3, 32, 32), 8
    yield "mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), (1, 3, 32, 32), 8
    yield "mha", MHA, (1, 8, 6), None


@pytest.mark.parametrize("name,factory,shape,round_to", list(_pruned_parity_cases()),
                         ids=[c[0] for c in _pruned_parity_cases()])
def test_pruned_model_exports_with_ort_parity(name, factory, shape, round_to, tmp_path) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    result = passes.prune(model, x, ratio=0.5, round_to=round_to)
    assert result.report.params_after < result.report.params_before and result.report.verify.ok
    exported = passes.export_onnx(result.model, x, tmp_path / "pruned.onnx")  # batch 1 and 2
    assert exported.max_rel_error < 1e-4 and exported.max_abs_error < 1e-4
    assert os.path.getsize(exported) == exported.file_bytes


def test_attention_macs_are_counted_before_and_after_pruning() -> None:
    """nn.MultiheadAttention runs SDPA's CPU flash kernel, which FlopCounterMode counts as zero;
    passes.count adds it, so the original's count includes QK^T and AV like the pruned one's."""
    torch.manual_seed(0)
    model, x = MHA(dim=64, heads=4).eval(), torch.randn(1, 100, 6)
    _, macs = passes.count(model, x)
    linear = 100 * (6 * 64 + 64 * 192 + 64 * 64 + 64 * 64 + 64 * 64) + 64 * 5
    assert macs == linear + 2 * 100 * 100 * 64  # QK^T and AV: 2 * N * N * width
    result = passes.prune(model, x, ratio=0.5)
    assert result.report.macs_before == macs
    assert result.report.macs_after == passes.count(result.model, x)[1]

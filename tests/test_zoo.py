"""A fast subset of benchmarks/zoo.py: its per-model checks, in this process, on one model per
family at tiny inputs. passes only (no Torch-Pruning, no latency): the pruned model runs and keeps
its output shapes, MACs after <= 0.6 x before, masked equivalence holds exactly, the ONNX file
exports and ONNX Runtime matches torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

# name -> (constructor kwargs, input shapes): the smallest inputs the models allow
CASES = {
    "resnet18": ({}, [(1, 3, 32, 32)]),
    "mobilenet_v3_small": ({}, [(1, 3, 32, 32)]),
    "efficientnet_b0": ({}, [(1, 3, 32, 32)]),
    "regnet_x_400mf": ({}, [(1, 3, 32, 32)]),
    "densenet121": ({}, [(1, 3, 32, 32)]),
    "shufflenet_v2_x0_5": ({}, [(1, 3, 32, 32)]),
    "squeezenet1_0": ({}, [(1, 3, 32, 32)]),
    "convnext_tiny": ({}, [(1, 3, 32, 32)]),
    "vit_b_16": ({"image_size": 32}, [(1, 3, 32, 32)]),
    "swin_t": ({}, [(1, 3, 32, 32)]),
    "lraspp_mobilenet_v3_large": ({"weights_backbone": None}, [(1, 3, 64, 64)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model(name):
    kwargs, shapes = CASES[name]
    row = zoo.run_one(name, tp=False, latency=False, kwargs=kwargs, shapes=shapes)
    assert row["stage"] == "done"
    assert row["passes_error"] is None and row["passes_ok"], row["passes_error"]
    assert row["passes_params"] < row["params_before"]
    assert row["passes_macs"] <= zoo.MAX_MAC_RATIO * row["macs_before"]
    assert row["equivalence"] == "exact" and row["max_rel_error"] <= 1e-4
    assert row["passes_onnx_rel_err"] <= 1e-3
    assert "tp_params" not in row and "orig_ms" not in row  # neither Torch-Pruning nor latency ran


def test_zoo_killed_child_fails_the_stage_it_was_in(tmp_path, monkeypatch):
    # the parent turns a timeout/crash into a row: earlier stages' results stay, the running one fails
    monkeypatch.setattr(zoo, "BUGS", tmp_path)
    partial = {"model": "resnet18", "stage": "tp", "passes_ok": True, "passes_error": None}
    row = zoo._failed_row("resnet18", partial, "timeout after 600 s")
    assert row["passes_ok"] and not row["tp_ok"]
    assert row["tp_error"] == "timeout after 600 s during tp"
    row = zoo._failed_row("resnet18", {"stage": "passes"}, "crashed (exit code 1)")
    assert not row["passes_ok"] and row["passes_error"] == "crashed (exit code 1) during passes"
    assert row["tp_error"].startswith("not reached") and Path(row["repro"]).is_file()


def test_zoo_specs_and_summary():
    assert len(zoo.models_of(["classification"])) == 80
    assert zoo.spec("inception_v3") == ({"aux_logits": False, "init_weights": False}, [(1, 3, 96, 96)])
    assert zoo.spec("vit_h_14")[0] == {"image_size": 56}
    rows = [{"family": "classification", "passes_ok": True, "tp_ok": False},
            {"family": "segmentation", "passes_ok": True, "tp_ok": True}]
    assert zoo.summary_lines(rows) == [
        "passes: 2/2 succeeded (classification 1/1, segmentation 1/1)",
        "Torch-Pruning: 1/2 succeeded (classification 0/1, segmentation 1/1)"]

"""Distillation: bad input is refused before training; two gloo processes train like one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from edge_support import ROOT, evaluator_for
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.recipe import DistillConfig
from edge_pipeline.sources import build_model
from edge_pipeline.stages.distill import distill
from edge_pipeline.training import kd_loss

ARCH = {"source": "zoo:digits-cnn", "num_classes": 10, "in_channels": 1, "width": 0.25}


def test_kd_loss_is_zero_when_student_matches_teacher_and_no_labels():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, None, 0.7, 4.0, soft_only=True).abs() < 1e-6
    labels = torch.randint(0, 10, (8,))
    mixed = kd_loss(logits, logits, labels, 0.7, 4.0, soft_only=False)
    assert torch.isclose(mixed, 0.3 * nn.functional.cross_entropy(logits, labels), atol=1e-6)


@pytest.fixture(scope="module")
def teacher(digits):
    from edge_pipeline.training import fit

    return fit(build_model("zoo:digits-cnn", 10, 1), digits.train, epochs=4, lr=2e-3)


def test_student_learns_from_teacher_soft_targets_only(digits, teacher):
    student = build_model("zoo:digits-cnn", 10, 1, width=0.25)
    res = distill(teacher, student, ARCH, digits, DistillConfig(epochs=8, soft_only=True),
                  evaluator_for(teacher, digits))
    assert len(res.curves) == 8
    assert res.curves[-1]["val_cosine"] > 0.85 and res.curves[-1]["val_metric"] > 0.85


def test_hint_loss_with_projection(digits):
    teacher = build_model("zoo:digits-cnn", 10, 1).eval()
    student = build_model("zoo:digits-cnn", 10, 1, width=0.25)
    res = distill(teacher, student, ARCH, digits,
                  DistillConfig(epochs=1, hint_layers=[("features.3", "features.3")]), evaluator_for(teacher, digits))
    assert res.curves


def test_output_shape_mismatch_is_refused(digits):
    teacher = build_model("zoo:digits-cnn", 10, 1)
    student = build_model("zoo:digits-cnn", 7, 1)
    with pytest.raises(PipelineError, match=r"student output 'output' has shape \(7,\), the teacher's \(10,\)"):
        distill(teacher, student, ARCH, digits, DistillConfig(epochs=1), evaluator_for(teacher, digits))


def test_missing_hint_layer_is_refused(digits):
    teacher = build_model("zoo:digits-cnn", 10, 1)
    student = build_model("zoo:digits-cnn", 10, 1, width=0.25)
    with pytest.raises(PipelineError, match="hint layer 'nope' does not exist in the student") as e:
        distill(teacher, student, ARCH, digits, DistillConfig(epochs=1, hint_layers=[("nope", "features.0")]),
                evaluator_for(teacher, digits))
    assert "distill.hint_layers[0]" in e.value.where


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_where_there_is_none_is_refused(digits):
    teacher = build_model("zoo:digits-cnn", 10, 1)
    with pytest.raises(PipelineError, match="no CUDA device"):
        distill(teacher, build_model("zoo:digits-cnn", 10, 1, width=0.5), ARCH, digits,
                DistillConfig(epochs=1, device="cuda"), evaluator_for(teacher, digits))


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process_layout(write_recipe, tmp_path):
    path = write_recipe(prune={"ratio": 0.5, "iterative_steps": 1, "finetune_epochs": 0},
                        distill={"epochs": 6, "device": "cpu"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "edge_pipeline.cli", "distill", str(path), "--run-id", "one"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "edge_pipeline.cli", "distill", str(path),
                          "--run-id", "two"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (tmp_path / "runs" / "tiny" / r for r in ("one", "two"))
    files = [sorted(p.name for p in (r / "02-distill").iterdir()) for r in (one, two)]
    assert files[0] == files[1]
    m1 = json.loads((one / "run.json").read_text())["stages"]["distill"]["metrics"]
    m2 = json.loads((two / "run.json").read_text())["stages"]["distill"]["metrics"]
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    curves = json.loads((two / "02-distill" / "curves.json").read_text())
    assert curves[-1]["train_loss"] < curves[0]["train_loss"], "DDP training converges"
    assert m2["val_metric"] > 0.8
    assert not list(two.glob(".*tmp*")), "only rank 0 writes; no stray folders"

"""Stage folders are complete or absent; unchanged stages are reused; a killed run resumes."""

import json

from edge_support import recorded_notes, sigkill_mid_stage

from edge_pipeline.pipeline import run


def test_rerun_reuses_and_config_change_reruns_only_downstream(write_recipe, tmp_path):
    path = write_recipe(prune={"ratio": 0.3, "iterative_steps": 1, "finetune_epochs": 0})
    first = run(path)
    assert first.stages["teacher"]["status"] == "ran" and first.stages["prune"]["status"] == "ran"
    again = run(path)
    assert again.stages["teacher"]["status"] == "reused" and again.stages["prune"]["status"] == "reused"
    changed = write_recipe(prune={"ratio": 0.4, "iterative_steps": 1, "finetune_epochs": 0})
    third = run(changed)
    assert third.stages["teacher"]["status"] == "reused" and third.stages["prune"]["status"] == "ran"
    doc = json.loads((third.run_dir / "run.json").read_text())
    assert doc["stages"]["prune"]["config"]["ratio"] == 0.4
    assert doc["stages"]["prune"]["inputs"]["teacher"] == doc["stages"]["teacher"]["key"]
    assert doc["toolchain"]["torch"].startswith("2.13.0")


def test_sigkill_mid_run_leaves_no_partial_stage_and_resumes(write_recipe, tmp_path):
    # Distillation is long enough to be killed in the middle of.
    path = write_recipe(prune={"ratio": 0.3, "iterative_steps": 1, "finetune_epochs": 0},
                        distill={"epochs": 12, "patience": 12})
    run_dir = tmp_path / "runs" / "tiny" / "default"
    sigkill_mid_stage(["run", str(path)], run_dir, "02-distill", ".distill-resume-*")
    assert not (run_dir / "02-distill").exists(), "a killed stage must not look complete"
    assert (run_dir / "01-prune" / "stage.json").exists()
    checkpoint = next(run_dir.glob(".distill-resume-*"))
    import torch

    done_before_kill = int(torch.load(checkpoint, weights_only=True)["epoch"])
    from edge_pipeline import progress

    notes = recorded_notes()
    with progress.use_sink(notes):
        resumed = run(path)
    assert f"distill: resumed after epoch {done_before_kill}" in notes.said, notes.said
    assert resumed.stages["teacher"]["status"] == "reused" and resumed.stages["prune"]["status"] == "reused"
    assert resumed.stages["distill"]["status"] == "ran"
    curves = json.loads((run_dir / "02-distill" / "curves.json").read_text())
    assert len(curves) == 12 and done_before_kill >= 1, "training went on from the checkpoint to the last epoch"
    assert not checkpoint.exists(), "the resume checkpoint is removed once the stage completes"
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name], "temporary folders are cleaned up"
    assert (run_dir / "02-distill" / "stage.json").exists()


def test_pinned_set_is_drawn_once_then_reused_without_rerunning_downstream(write_recipe, tmp_path):
    pinned = tmp_path / "calibration" / "set"
    path = write_recipe(targets=["ort-mobile-fp32"], calibrate={"set": str(pinned), "samples": 32},
                        device_test={"enabled": False}, package={"enabled": False})
    first = run(path, until="calibrate")
    assert set(first.stages) == {"calibrate"}, "calibrate needs no teacher"
    assert pinned.with_suffix(".npz").is_file() and pinned.with_suffix(".json").is_file()
    again = run(path, until="calibrate")
    assert again.stages["calibrate"]["status"] == "reused"
    # Editing the pinned set changes the key: calibrate runs again and refuses the tampered file.
    import numpy as np

    with np.load(pinned.with_suffix(".npz")) as z:
        np.savez(pinned.with_suffix(".npz"), input_0=z["input_0"] * 0.5, y=z["y"])
    import pytest

    from edge_pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="does not match the sha256"):
        run(path, until="calibrate")

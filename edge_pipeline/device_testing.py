"""``edge-pipeline test RUN``: measure a finished run's artifacts on the given devices."""

from __future__ import annotations

import json
from pathlib import Path

from edge_pipeline.errors import PipelineError
from edge_pipeline.modelio import load_model
from edge_pipeline.runstore import find_stage
from edge_pipeline.stages.device_test import test_targets
from edge_pipeline.targets import load_profile
from edge_pipeline.training import predict


def test_run(run_dir: Path, devices: list[str], threads: int | None, runs: int, warmup: int, timeout: float) -> Path:
    from edge_pipeline.devices import parse_device
    from edge_pipeline.sources import load_data

    for i, d in enumerate(devices):
        parse_device(d, where=f"--device[{i}]")
    lower, teacher = find_stage(run_dir, "lower"), find_stage(run_dir, "teacher")
    if lower is None or teacher is None:
        raise PipelineError(f"{run_dir} is not a run folder with a completed lower stage", where=str(run_dir),
                            hint="pass runs/<recipe>/<run-id> after edge-pipeline run")
    data = load_data(teacher[1]["config"]["data"])
    model, _ = load_model(teacher[0] / "model.pt")
    profiles = [load_profile(t) for t in lower[1]["metrics"]["targets"]]
    res = test_targets(lower[0], lower[1]["metrics"], profiles, devices, data.test.x, data.test.y,
                       predict(model, data.test.x), threads, runs, warmup, timeout)
    path = run_dir / "device-results.json"
    path.write_text(json.dumps(res, indent=1))
    return path

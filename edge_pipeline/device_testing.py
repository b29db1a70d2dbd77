"""``edge-pipeline test RUN``: measure a finished run's artifacts on the given devices."""

from __future__ import annotations

import json
from pathlib import Path

from edge_pipeline.errors import PipelineError
from edge_pipeline.runstore import find_stage
from edge_pipeline.stages.device_test import measure_targets
from edge_pipeline.targets import load_profile


def evaluator_for_run(run_dir: Path):
    """The data, model interface, metric and teacher a finished run was measured with, from its folders."""
    from edge_pipeline.evaluation import Evaluator, resolve_metric
    from edge_pipeline.interface import ModelInterface
    from edge_pipeline.modelio import load_model
    from edge_pipeline.recipe import SplitConfig
    from edge_pipeline.sources import load_data

    teacher = find_stage(run_dir, "teacher")
    if teacher is None:
        raise PipelineError(f"{run_dir} is not a run folder with a completed teacher stage", where=str(run_dir),
                            hint="pass runs/<recipe>/<run-id> after edge-pipeline run")
    run_doc = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    recipe = run_doc.get("recipe") or {}
    iface = ModelInterface.from_dict(teacher[1]["metrics"]["interface"])
    split = SplitConfig(**recipe.get("split", {}))
    data = load_data(teacher[1]["config"]["data"], preprocess=recipe.get("preprocess"), labels=recipe.get("labels"),
                     fractions=split.fractions()).ordered_as(iface.input_names)
    metric = resolve_metric(recipe.get("metric", "auto"), iface.output_names, data.train.y is not None,
                            recipe.get("metric_output"))
    model, _ = load_model(teacher[0] / "model.pt")
    return Evaluator(data, iface, metric, model)


def measure_run(run_dir: Path, devices: list[str], threads: int | None, runs: int, warmup: int, timeout: float) -> Path:
    from edge_pipeline.devices import parse_device

    for i, d in enumerate(devices):
        parse_device(d, where=f"--device[{i}]")
    lower = find_stage(run_dir, "lower")
    if lower is None:
        raise PipelineError(f"{run_dir} is not a run folder with a completed lower stage", where=str(run_dir),
                            hint="pass runs/<recipe>/<run-id> after edge-pipeline run")
    ev = evaluator_for_run(run_dir)
    profiles = [load_profile(t) for t in lower[1]["metrics"]["targets"]]
    res = measure_targets(lower[0], lower[1]["metrics"], profiles, devices, ev, threads, runs, warmup, timeout)
    path = run_dir / "device-results.json"
    path.write_text(json.dumps(res, indent=1))
    return path


def acceptance_failures(target: str, device: str, m: dict) -> list[str]:
    """Why one target on one device fails its release gate (empty when it passes): the acceptance suite in
    device_tests/ asserts exactly this, and ``edge-pipeline test`` uses it directly where pytest is absent."""
    if "error" in m:
        return [f"{target} on {device}: {m['error']}"]
    missed = load_profile(target).budgets.violations(size_bytes=m["size_bytes"], accuracy_drop=m.get("metric_drop"),
                                                     p50_ms=m["latency"]["p50_ms"])
    return [f"{target} on {device}: {x}" for x in missed + [f for f in m.get("failures", []) if f not in missed]]


def acceptance(results: dict) -> tuple[int, list[str]]:
    """(cases passed, one message per failed case) over every target x device in a results document."""
    failures, passed = [], 0
    for target, by in results["results"].items():
        for device, m in by.items():
            if m.get("unreachable"):  # nothing measured: reported as unreachable, not as a case
                continue
            f = acceptance_failures(target, device, m)
            if f:
                failures.append("; ".join(f))
            else:
                passed += 1
    return passed, failures

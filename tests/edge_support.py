"""Helpers the tests import by name. A top-level module with a name of its own: pytest puts this folder on
sys.path, and ``tests`` or ``conftest`` may name another installed package's modules (one ships ``tests/``)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edge_pipeline.cli"]


def evaluator_for(model, data, metric: str = "auto"):
    """The Evaluator a pipeline run builds: the model interface, the recipe's metric, the model as reference."""
    from edge_pipeline.evaluation import Evaluator, resolve_metric
    from edge_pipeline.interface import discover

    iface = discover(model, data.example, data.input_names)
    return Evaluator(data, iface, resolve_metric(metric, iface.output_names, data.train.y is not None), model)


def run_cli(*args, timeout=600, cwd=ROOT):
    # Recipes name test models as ``realshaped:NAME``: this folder is importable in the CLI's process too.
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def sigkill_mid_stage(args, run_dir: Path, stage_folder: str, checkpoint_glob: str, timeout: float = 300) -> None:
    """Runs the CLI with ``args`` and SIGKILLs it once the stage is being written (``.<stage_folder>.tmp-*``) and
    has checkpointed an epoch (``checkpoint_glob`` in the run folder): mid-stage, not between stages."""
    import signal
    import time

    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if list(run_dir.glob(f".{stage_folder}.tmp-*")) and list(run_dir.glob(checkpoint_glob)):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def killed_then_resumed(args, recipe, run_dir: Path, stage: str, folder: str, description: str, epochs: int):
    """SIGKILLs ``args`` mid-``stage`` (its folder ``folder``, its checkpoint ``.<stage>-resume-*``), checks that
    nothing looks complete, runs the recipe again up to the stage and checks it resumed after the checkpointed
    epoch (the note ``<description>: resumed after epoch N``) and removed the checkpoint. Returns that summary."""
    import torch

    from edge_pipeline import progress
    from edge_pipeline.pipeline import run

    sigkill_mid_stage(args, run_dir, folder, f".{stage}-resume-*")
    assert not (run_dir / folder).exists(), "a killed stage must not look complete"
    checkpoint = next(run_dir.glob(f".{stage}-resume-*"))
    done_before_kill = int(torch.load(checkpoint, weights_only=True)["epoch"])
    notes = recorded_notes()
    with progress.use_sink(notes):
        resumed = run(recipe, until=stage)
    assert f"{description}: resumed after epoch {done_before_kill}" in notes.said, notes.said
    assert resumed.stages["teacher"]["status"] == "reused" and resumed.stages[stage]["status"] == "ran"
    assert 1 <= done_before_kill < epochs and not checkpoint.exists()
    return resumed


def recorded_notes():
    """A progress sink that keeps what the pipeline says (``.said``): training is deterministic, so only its
    notes tell a resume from a fresh start."""
    from edge_pipeline import progress

    class Notes(progress._Silent):
        def __init__(self):
            self.said: list[str] = []

        def note(self, message):
            self.said.append(message)

    return Notes()

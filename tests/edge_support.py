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

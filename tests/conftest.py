import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edge_pipeline.cli"]


@pytest.fixture(scope="session")
def digits():
    from edge_pipeline.sources import load_data

    return load_data("zoo:digits")


@pytest.fixture
def write_recipe(tmp_path):
    """Writes a small, fast recipe (overrides merged in) and returns its path."""

    def write(**overrides):
        doc = {"name": "tiny", "model": "zoo:digits-cnn", "data": "zoo:digits", "train": {"epochs": 3},
               "prune": {"enabled": False}, "distill": {"enabled": False}, "targets": [],
               "output": str(tmp_path / "runs")}
        for k, v in overrides.items():
            doc[k] = v
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def evaluator_for(model, data, metric: str = "auto"):
    """The Evaluator a pipeline run builds: the model interface, the recipe's metric, the model as reference."""
    from edge_pipeline.evaluation import Evaluator, resolve_metric
    from edge_pipeline.interface import discover

    iface = discover(model, data.example, data.input_names)
    return Evaluator(data, iface, resolve_metric(metric, iface.output_names, data.train.y is not None), model)


def run_cli(*args, timeout=600, cwd=ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)

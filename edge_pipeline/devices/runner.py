"""Access to the standalone on-device runner (device_tests/runner.py), the one script every device runs."""

from __future__ import annotations

import importlib.util
from functools import cache

from edge_pipeline.resources import shipped

RUNNER_PATH = shipped("device_tests") / "runner.py"


@cache
def load_runner():
    """The runner as a module, for running artifacts in this process (parity, verify)."""
    spec = importlib.util.spec_from_file_location("edge_pipeline_device_runner", RUNNER_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

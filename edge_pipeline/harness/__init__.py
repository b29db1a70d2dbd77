"""The on-device harness: ``runner.py`` and one ``runtime_<name>.py`` per runtime, numpy and the runtime only.

Every device runs these files as they are (they are copied to boards and phones as a flat folder and started
with ``python runner.py``); this machine imports the same modules as ``edge_pipeline.harness.*``. A new runtime
is one new ``runtime_<name>.py`` here: the runner finds it by its file name and picks it by artifact suffix.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "runner.py"


def files() -> list[Path]:
    """What a device needs to run any artifact: the runner and every runtime module."""
    return [RUNNER, *sorted(HERE.glob("runtime_*.py"))]

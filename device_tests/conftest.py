"""The device acceptance suite gates a release: ``pytest device_tests --results RESULTS.json``.

RESULTS.json is what ``edge-pipeline test`` writes (target -> device -> measured figures).
"""

import json
from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--results", action="store", default=None, help="device results JSON from edge-pipeline test")


def _cases(config):
    import pytest

    path = config.getoption("--results")
    if not path:  # a gate run on nothing must not pass
        raise pytest.UsageError("the acceptance suite needs --results RESULTS.json (written by edge-pipeline test)")
    doc = json.loads(Path(path).read_text())
    # A device that could not be reached measured nothing: edge-pipeline test reports it (exit 4), not as a case.
    return [(t, d, m) for t, by in doc["results"].items() for d, m in by.items() if not m.get("unreachable")]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[f"{t}@{d}" for t, d, _ in cases])

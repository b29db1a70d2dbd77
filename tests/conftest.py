import os

import pytest
import yaml

# The CLI wraps its messages at $COLUMNS when stderr is not a terminal; pytest-xdist's workers run with a narrow
# one, and the tests read whole sentences: one width for every process the tests start.
os.environ["COLUMNS"] = "200"

# Each test worker (and every CLI run it starts) gets its share of the cores: with every process using all of
# them, OpenMP's spinning threads fight, and the zoo check's brief training took 130 s beside another worker
# against 10 s alone (2 workers, 2 cores). Subprocesses read OMP_NUM_THREADS; this process is told directly.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    _threads = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


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

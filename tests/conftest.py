import os

import pytest
import yaml

# The CLI wraps its messages at $COLUMNS when stderr is not a terminal; pytest-xdist's workers run with a narrow
# one, and the tests read whole sentences: one width for every process the tests start.
os.environ["COLUMNS"] = "200"


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

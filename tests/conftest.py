import pytest
import yaml


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

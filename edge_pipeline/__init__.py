"""edge-pipeline: a trained PyTorch model in, a tested release bundle of int8 edge models out.

Python API: ``edge_pipeline.run("recipes/digits.yaml")`` does what ``edge-pipeline run`` does.
"""

from __future__ import annotations

__version__ = "0.1.0"


def run(recipe_path, **kwargs):
    """Run a recipe (see :func:`edge_pipeline.pipeline.run`); returns a RunSummary."""
    from edge_pipeline.pipeline import run as _run

    return _run(recipe_path, **kwargs)

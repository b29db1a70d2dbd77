"""One module per runtime, the same small interface, found through one registry.

``export(model, example, calibration, profile, out_dir, float_layers=()) -> Path`` writes the deployable
file(s) and a ``describe`` JSON beside them; ``describe(path) -> dict`` returns what an integrator needs
(I/O, int8 scale/zero-point, operator coverage); ``SUFFIX`` is the artifact's file type.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKEND_MODULES = {"executorch": "executorch", "onnxruntime": "onnxruntime", "tflite": "tflite"}


def get_backend(name: str) -> ModuleType:
    return importlib.import_module(f"edge_pipeline.backends.{BACKEND_MODULES[name]}")

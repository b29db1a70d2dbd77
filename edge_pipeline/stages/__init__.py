"""The stage contract and its registry: one module per stage in this package, found by scanning it.

A module is a stage when it declares ``STAGE = Stage(...)`` and provides ``run(ctx, out_dir) -> metrics``. It
reads what earlier stages made only through the run context (``ctx.model()``, ``ctx.teacher()``,
``ctx.calibration()``, ``ctx.qat_state(target)``, ``ctx.stage_dir(name)``), never by importing another stage.
The pipeline, the CLI (stage commands, summary), package's manifest and bench iterate over the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any


def _always(recipe) -> bool:
    return True


def _nothing(ctx) -> dict:
    return {}


def _no_outputs(metrics: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    order: float  # its place in the pipeline (the run folder's NN- prefix counts the stages in this order)
    deps: tuple[str, ...]  # stages whose products it reads: their cache keys are part of its own
    config: Callable[[Any], Any]  # the recipe -> the part of it this stage depends on (cache key, stage.json)
    enabled: Callable[[Any], bool] = _always
    # What the stage reads from outside the run folder (data, pinned files), hashed into its cache key.
    external: Callable[[Any], dict] = _nothing
    # What it writes outside the run folder (from its metrics): when any is gone, the stage runs again.
    outputs: Callable[[dict], list[str]] = _no_outputs
    # Before any stage runs: refuse a bad configuration (ctx) with a clear error. None: nothing to check.
    check: Callable[[Any], None] | None = None
    produces_model: bool = False  # writes model.pt, the model the stages after it work on
    trains: bool = False  # every torchrun rank runs it (the others wait for rank 0)
    command: str | None = None  # help of its own CLI command (``edge-pipeline NAME RECIPE``); None: none
    summary_keys: tuple[str, ...] = ()  # the metrics the CLI summary shows (all are in run.json)
    summary: Callable[[dict], str] | None = None  # or its own one-line summary of its metrics
    # Its line in the model card's "What each stage did": (its metrics, the manifest) -> markdown. None: none.
    card: Callable[[dict, dict], str] | None = None
    # Its own section of the HTML report: (its folder, its metrics, lower's targets) -> HTML, or None.
    report: Callable[[Path, dict, dict], str | None] | None = None


_EXTRA: dict[str, ModuleType] = {}


@cache
def _scanned() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(mod, "STAGE", None), Stage):
            found[mod.STAGE.name] = mod
    return found


def fmt_metric(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def stage_modules() -> list[ModuleType]:
    """Every stage's module, in pipeline order."""
    return sorted({**_scanned(), **_EXTRA}.values(), key=lambda m: m.STAGE.order)


def stages() -> list[Stage]:
    return [m.STAGE for m in stage_modules()]


def stage_names() -> list[str]:
    return [s.name for s in stages()]


def register(module: ModuleType) -> None:
    """Add a stage module from outside this package (a plugin, a test); it declares ``STAGE`` and ``run``."""
    _EXTRA[module.STAGE.name] = module


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)

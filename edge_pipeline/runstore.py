"""The run directory: ``runs/<recipe>/<run-id>/NN-<stage>/`` plus ``run.json``.

A stage folder is complete or absent: it is written under a hidden temporary name and renamed into place
when the stage returns. Each holds ``stage.json`` with its cache key (a hash of the stage's config, its
inputs' keys and the toolchain versions); a stage whose key is unchanged is reused instead of re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_SCHEMA = 1
TOOLCHAIN = ("torch", "torchao", "torch-pruning", "numpy", "edge-pipeline")  # and every backend's packages


def toolchain_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    from edge_pipeline.backends import backends

    for name in dict.fromkeys(TOOLCHAIN + tuple(p for b in backends().values() for p in b.BACKEND.packages)):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_fingerprint() -> str:
    """sha256 over edge-pipeline's own code, its on-device harness and built-in target profiles: a changed
    pipeline re-runs its stages (a version string alone does not change between commits)."""
    from edge_pipeline.targets import BUILTIN_DIR

    pkg = Path(__file__).resolve().parent
    files = sorted(pkg.rglob("*.py")) + sorted(BUILTIN_DIR.glob("*.yaml"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def module_fingerprint(source: str) -> str | None:
    """sha256 of the file that defines a ``package.module:callable`` source: editing the user's model or data
    code changes the keys of the stages that used it."""
    import importlib.util

    mod = source.partition(":")[0]
    if not mod or source.startswith("zoo:") or ":" not in source:
        return None
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return sha256_file(Path(origin)) if origin and Path(origin).is_file() else None


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class RunStore:
    """One run folder. Stages are numbered in pipeline order: ``00-teacher``, ``01-prune``, ..."""

    def __init__(self, root: Path, recipe_name: str, run_id: str, stage_order: list[str]):
        self.dir = Path(root) / recipe_name / run_id
        self.order = stage_order
        self.versions = {**toolchain_versions(), "edge-pipeline-source": source_fingerprint()}

    def folder_name(self, stage: str) -> str:
        return f"{self.order.index(stage):02d}-{stage}"

    def stage_dir(self, stage: str) -> Path:
        return self.dir / self.folder_name(stage)

    def cache_key(self, stage: str, config: Any, inputs: dict[str, str]) -> str:
        return stable_hash({"stage": stage, "config": config, "inputs": inputs, "versions": self.versions})

    def record(self, stage: str) -> dict | None:
        """The stage.json of a complete stage folder, or None."""
        f = self.stage_dir(stage) / "stage.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def is_current(self, stage: str, key: str) -> bool:
        rec = self.record(stage)
        return rec is not None and rec.get("key") == key

    @contextmanager
    def writing(self, stage: str) -> Iterator[Path]:
        """Yields a temporary folder; on success it replaces the stage folder in one rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clean_partial()
        tmp = self.dir / f".{self.folder_name(stage)}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.stage_dir(stage)
        if final.exists():
            old = self.dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One run at a time per run folder: a second one refuses, naming the holder's PID, instead of
        deleting the first one's work in progress. The OS drops the lock when its holder dies."""
        import fcntl

        from edge_pipeline.errors import PipelineError

        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.dir / ".lock", "a+")  # noqa: SIM115 - held open for the whole run
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise PipelineError(f"run folder is in use by another edge-pipeline run (PID {holder})",
                                    where=str(self.dir), hint="wait for it to finish, or pass another --run-id") \
                    from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            f.close()

    def clean_partial(self) -> None:
        """Remove temporary folders a killed run left behind."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def write_run_json(self, recipe: dict, recipe_path: str | None, status: str, extra: dict | None = None) -> dict:
        stages = {}
        for stage in self.order:
            rec = self.record(stage)
            if rec is not None:
                stages[stage] = {"folder": self.folder_name(stage), **rec}
        doc = {
            "schema": RUN_SCHEMA,
            "recipe": recipe,
            "recipe_path": recipe_path,
            "run_dir": str(self.dir),
            "status": status,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "toolchain": self.versions,
            "stages": stages,
            **(extra or {}),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / "run.json", doc)
        return doc


def find_stage(run_dir: Path, stage: str) -> tuple[Path, dict] | None:
    """A completed stage folder of a run (``NN-<stage>``) and its stage.json, or None."""
    for d in sorted(Path(run_dir).glob(f"[0-9][0-9]-{stage}")):
        if (d / "stage.json").is_file():
            return d, json.loads((d / "stage.json").read_text())
    return None

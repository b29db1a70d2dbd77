"""Sequences the stages: computes each stage's cache key, reuses a stage whose key is unchanged, runs the
rest in order, and records everything in ``run.json``. The stages themselves know nothing of this."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edge_pipeline import capture, distributed, progress
from edge_pipeline.errors import EXIT_UNREACHABLE, BudgetFailure, DevicesUnreachable, PipelineError
from edge_pipeline.recipe import Recipe, load_recipe
from edge_pipeline.runstore import RunStore


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str  # edge_pipeline.stages.<module>, with run(ctx, out_dir) -> metrics
    deps: tuple[str, ...]
    config: Callable[[Recipe], Any]
    enabled: Callable[[Recipe], bool] = lambda r: True
    # What the stage reads from outside the run folder (data, pinned files), hashed into its cache key.
    external: Callable[[Context], dict] = lambda ctx: {}
    # What it writes outside the run folder (from its metrics): when any is gone, the stage runs again.
    outputs: Callable[[dict], list[str]] = lambda metrics: []


def _lower_config(r: Recipe) -> dict:
    from edge_pipeline.targets import load_profile

    return {"targets": [load_profile(t).model_dump() for t in r.targets]}


STAGES: list[StageDef] = [
    StageDef("teacher", "teacher", (), lambda r: {"model": r.model, "weights": r.weights, "data": r.data,
                                                   "train": r.train.model_dump(), "metric": r.metric,
                                                   "metric_output": r.metric_output},
             external=lambda ctx: {"data": ctx.data_fingerprint, **_user_code(ctx.recipe)}),
    StageDef("prune", "prune", ("teacher",), lambda r: r.prune.model_dump(), lambda r: r.prune.enabled),
    StageDef("distill", "distill", ("teacher", "prune"), lambda r: r.distill.model_dump(),
             lambda r: r.distill.enabled),
    StageDef("calibrate", "calibrate", (), lambda r: {"data": r.data, **r.calibrate.model_dump()},
             lambda r: any(t for t in r.targets),
             external=lambda ctx: {"data": ctx.data_fingerprint, "set": _pinned_set_hash(ctx.recipe)}),
    StageDef("qat", "qat", ("teacher", "prune", "distill", "calibrate"),
             lambda r: {**r.qat.model_dump(), **_lower_config(r),
                        "loss": r.distill.model_dump(include={"alpha", "temperature", "soft_only", "logit_outputs"})},
             lambda r: bool(r.targets) and r.qat.mode != "off"),
    StageDef("lower", "lower", ("teacher", "prune", "distill", "calibrate", "qat"), _lower_config,
             lambda r: bool(r.targets)),
    StageDef("device-test", "device_test", ("teacher", "lower"),
             lambda r: {"devices": r.devices, **r.device_test.model_dump()},
             lambda r: bool(r.targets) and r.device_test.enabled),
    StageDef("package", "package", ("teacher", "prune", "distill", "calibrate", "qat", "lower", "device-test"),
             lambda r: r.package.model_dump(), lambda r: bool(r.targets) and r.package.enabled,
             outputs=lambda m: [m["bundle"], m["tar"]]),
]
STAGE_NAMES = [s.name for s in STAGES]


@dataclass
class Context:
    """What a stage may read: the recipe, the data, and the folders of the stages before it."""

    recipe: Recipe
    recipe_path: str | None
    store: RunStore
    keys: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    current_stage: str | None = None

    @cached_property
    def loaded_data(self):
        """The data as its source gives it (named inputs in the source's key order)."""
        from edge_pipeline.sources import load_data

        r = self.recipe
        return load_data(r.data, where=f"{self.recipe_path}: data", preprocess=r.preprocess.model_dump(),
                         labels=r.labels.model_dump(), fractions=r.split.fractions())

    @cached_property
    def data(self):
        """The data every stage uses: named inputs (dict items) in the order ``forward`` takes them."""
        from edge_pipeline.interface import bind_inputs

        raw = self.loaded_data
        if raw.input_names is None:
            return raw
        return raw.ordered_as(bind_inputs(self.fresh_model, raw.input_names, where=f"{self.recipe_path}: data"))

    @cached_property
    def fresh_model(self):
        """The recipe's model as built from its source (no trained weights): its signature and interface."""
        from edge_pipeline.sources import build_model

        raw = self.loaded_data
        return build_model(self.recipe.model, raw.num_classes, raw.input_shape[0], where=f"{self.recipe_path}: model")

    @cached_property
    def iface(self):
        """The model interface, discovered from a freshly built teacher and the data's example batch."""
        from edge_pipeline.interface import discover

        return discover(self.fresh_model, self.data.example, self.data.input_names,
                        where=f"{self.recipe_path}: model")

    @cached_property
    def metric(self):
        from edge_pipeline.evaluation import resolve_metric

        return resolve_metric(self.recipe.metric, self.iface.output_names, self.data.train.y is not None,
                              self.recipe.metric_output, where=f"{self.recipe_path}: metric")

    @cached_property
    def evaluator(self):
        """Scores with the recipe's metric against the trained teacher (after the teacher stage)."""
        from edge_pipeline.evaluation import Evaluator
        from edge_pipeline.modelio import load_model

        teacher, _ = load_model(self.store.stage_dir("teacher") / "model.pt")
        return Evaluator(self.data, self.iface, self.metric, teacher)

    def preflight(self) -> None:
        """Everything that can be checked before work: data (labels, NaN/Inf, sizes), the model on an example
        batch (outputs it can flatten, input dtypes), the metric, and the prune and distill settings."""
        from edge_pipeline.stages.distill import check_config as check_distill
        from edge_pipeline.stages.prune import check_config as check_prune
        from edge_pipeline.stages.qat import check_config as check_qat

        _ = self.metric  # loads the data, builds the model, discovers the interface
        if self.recipe.prune.enabled:
            check_prune(self.recipe.prune, self.data, self.recipe_path)
        if self.recipe.distill.enabled:
            check_distill(self.recipe, self.iface, self.data, self.recipe_path)
        check_qat(self.recipe, self.recipe_path)

    @cached_property
    def data_fingerprint(self) -> str:
        return self.data.fingerprint()

    def stage_dir(self, stage: str) -> Path | None:
        """The folder of an earlier, enabled stage, or None where that stage is disabled."""
        return None if self.keys.get(stage) == "disabled" else self.store.stage_dir(stage)

    def model_dir(self) -> Path:
        """The folder holding the model the later stages work on: distilled, else pruned, else the teacher."""
        for stage in ("distill", "prune", "teacher"):
            d = self.stage_dir(stage)
            if d is not None:
                return d
        raise AssertionError("teacher stage is always enabled")


@dataclass
class RunSummary:
    run_dir: Path
    stages: dict[str, dict]  # name -> {"status": ran|reused|disabled, "seconds", "metrics"}
    run_json: dict
    failed_targets: list[str]
    unreachable_devices: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """1 a target missed its budget; else 4 a device could not be reached (nothing measured there); else 0."""
        return 1 if self.failed_targets else EXIT_UNREACHABLE if self.unreachable_devices else 0


def run(recipe_path: str | Path, out: str | Path | None = None, run_id: str = "default",
        from_stage: str | None = None, only: str | None = None, force: bool = False,
        until: str | None = None) -> RunSummary:
    """Run a recipe; the Python equivalent of ``edge-pipeline run``. ``until`` stops after that stage."""
    recipe = load_recipe(recipe_path)
    for opt, val in (("--from-stage", from_stage), ("--only", only), ("until", until)):
        if val is not None and val not in STAGE_NAMES:
            raise PipelineError(f"unknown stage '{val}' for {opt}", hint=f"stages: {', '.join(STAGE_NAMES)}")
    if not run_id or not all(c.isalnum() or c in "-_." for c in run_id) or run_id.startswith("."):
        raise PipelineError(f"bad run id '{run_id}'", hint="use letters, digits, '-', '_' or '.'")
    root = Path(out or recipe.output)
    _check_writable(root, "--out" if out else f"{recipe_path}: output")
    store = RunStore(root, recipe.name, run_id, STAGE_NAMES)
    ddp = _join_torchrun(recipe)
    main = not ddp or distributed.is_main()
    with store.lock() if main else contextlib.nullcontext():
        if main:
            store.clean_partial()  # safe: no other run holds this folder
        return _run_locked(recipe, recipe_path, store, ddp, from_stage, only, force, until)


def _run_locked(recipe: Recipe, recipe_path, store: RunStore, ddp: bool, from_stage, only, force,
                until) -> RunSummary:
    ctx = Context(recipe, str(recipe_path), store)
    recipe_doc = recipe.model_dump()
    try:
        with capture.to_log(store.dir / "log.txt"):  # imports and checks before the first stage
            ctx.preflight()
        return _run_stages(ctx, recipe_doc, ddp, from_stage, only, force, until)
    except PipelineError as e:
        status = ("failed-targets" if isinstance(e, BudgetFailure) else
                  "devices-unreachable" if isinstance(e, DevicesUnreachable) else "failed")
        _record_failure(ctx, recipe_doc, ddp, status, e)
        raise
    except KeyboardInterrupt as e:
        _record_failure(ctx, recipe_doc, ddp, "interrupted", e)
        raise
    except Exception as e:
        _record_failure(ctx, recipe_doc, ddp, "failed", e)
        raise


def _check_writable(root: Path, where: str) -> None:
    """The run folder's root must be a folder this process can write (or be creatable)."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise PipelineError(f"{existing} is a file, not a folder", where=where, hint="name a folder for the runs")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write in {existing}", where=where, hint="name a folder you can write to")


def _record_failure(ctx: Context, recipe_doc: dict, ddp: bool, status: str, err: BaseException) -> None:
    """run.json never stays at "running" or at an earlier "ok": the status, the stage and the message."""
    if ddp and not distributed.is_main():
        return
    message = str(err) if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}"
    known = {"interface": ctx.iface.to_dict()} if "iface" in ctx.__dict__ else {}  # discovered before failing
    unreachable = ctx.metrics.get("device-test", {}).get("unreachable_devices")
    if unreachable:
        known["unreachable_devices"] = unreachable
    failed = sorted({t for m in ctx.metrics.values() for t in m.get("failed_targets", [])})
    metric = {"metric": ctx.metric.name} if "metric" in ctx.__dict__ else {}
    ctx.store.write_run_json(recipe_doc, ctx.recipe_path, status,
                             {"failed_stage": ctx.current_stage, "error": message.strip() or status,
                              "failed_targets": failed, **metric, **known})
    with contextlib.suppress(Exception):  # the report of a failure must not hide the failure itself
        _write_report(ctx)  # what was done before the failure, and the failure itself


def _write_report(ctx: Context) -> None:
    from edge_pipeline.report import write_report

    if ctx.store.dir.is_dir():
        write_report(ctx.store.dir, ctx.store.dir / "report.html")


def _run_stages(ctx: Context, recipe_doc: dict, ddp: bool, from_stage, only, force, until) -> RunSummary:
    recipe, store = ctx.recipe, ctx.store
    summary: dict[str, dict] = {}
    forced_from = 0 if force else (STAGE_NAMES.index(from_stage) if from_stage else None)

    goal = only or until
    needed = _dependencies(goal) | {goal} if goal else None
    for i, sd in enumerate(STAGES):
        if needed is not None and sd.name not in needed:
            continue  # --only / a stage command: stages the goal does not depend on are left alone
        if not sd.enabled(recipe):
            ctx.keys[sd.name] = "disabled"
            summary[sd.name] = {"status": "disabled"}
            continue
        ctx.current_stage = sd.name
        config = sd.config(recipe)
        inputs = {d: ctx.keys[d] for d in sd.deps} | sd.external(ctx)
        key = store.cache_key(sd.name, config, inputs)
        ctx.keys[sd.name] = key
        current = store.is_current(sd.name, key) and all(
            Path(p).exists() for p in sd.outputs(store.record(sd.name)["metrics"]))
        if only is not None and sd.name != only and not current:
            raise PipelineError(f"--only {only} needs stage '{sd.name}' up to date, and it is not",
                                hint="run without --only first")
        # Under torchrun, rank 0 runs every stage but the training ones alone; the others wait, then read.
        follower = ddp and not distributed.is_main() and sd.name not in ("distill", "qat")
        if follower:
            distributed.barrier()
        rerun = (only == sd.name) or (forced_from is not None and i >= forced_from and only is None)
        if follower or (current and not rerun):
            rec = store.record(sd.name)
            if not follower:
                progress.note(f"stage {sd.name}: reused (unchanged, {store.folder_name(sd.name)})")
            status = "reused"
        else:
            rec = _run_stage(ctx, sd, key, config, inputs, ddp, recipe_doc)
            status = "ran"
        if ddp and not follower:  # one barrier per stage on every rank: followers read after rank 0 renamed
            distributed.barrier()
        ctx.metrics[sd.name] = rec["metrics"]
        summary[sd.name] = {"status": status, **_brief(rec)}
        if sd.name in (until, only):
            break

    ctx.current_stage = None
    failed = sorted({t for m in ctx.metrics.values() for t in m.get("failed_targets", [])})
    unreachable = ctx.metrics.get("device-test", {}).get("unreachable_devices", {})
    if ddp and not distributed.is_main():
        return RunSummary(store.dir, summary, {}, failed, unreachable)
    status = "failed-targets" if failed else "devices-unreachable" if unreachable else "ok"
    doc = store.write_run_json(recipe_doc, ctx.recipe_path, status,
                               {"failed_targets": failed, "unreachable_devices": unreachable,
                                "interface": ctx.iface.to_dict(), "metric": ctx.metric.name})
    if ctx.keys.get("lower", "disabled") != "disabled" and store.record("lower"):
        _write_report(ctx)
    return RunSummary(store.dir, summary, doc, failed, unreachable)


def _dependencies(stage: str) -> set[str]:
    by_name = {s.name: s for s in STAGES}
    out, todo = set(), list(by_name[stage].deps)
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo += by_name[d].deps
    return out


def _run_stage(ctx: Context, sd: StageDef, key: str, config: Any, inputs: dict, ddp: bool,
               recipe_doc: dict) -> dict:
    started = time.time()
    with _stage_folder(ctx.store, sd.name, ddp) as tmp, progress.task(f"stage {sd.name}"):
        log = tmp / "log.txt"  # other libraries' output while the stage runs (when the CLI captures it)
        try:
            with capture.to_log(log):
                stage_mod = importlib.import_module(f"edge_pipeline.stages.{sd.module}")
                metrics = stage_mod.run(ctx, tmp)
        except BaseException as e:
            e.stage = sd.name
            if not isinstance(e, (PipelineError, KeyboardInterrupt)):  # a crash: its traceback goes to the log
                with open(log, "a") as f:
                    f.write(capture.TRACEBACK_MARK)
                    traceback.print_exception(e, file=f)
            if log.is_file() and log.stat().st_size:  # the stage folder goes; its log stays for the error to show
                kept = ctx.store.dir / f"failed-{ctx.store.folder_name(sd.name)}.log"
                shutil.copy(log, kept)
                e.log_path = kept
            raise
        after = inputs | sd.external(ctx)
        if after != inputs:
            # The stage wrote one of its own inputs (calibrate pinning a new set): key it as the next
            # run will see it, so that run reuses the stage.
            inputs, key = after, ctx.store.cache_key(sd.name, config, after)
            ctx.keys[sd.name] = key
        rec = {"stage": sd.name, "key": key, "config": config, "inputs": inputs,
               "seconds": round(time.time() - started, 3), "metrics": metrics}
        (tmp / "stage.json").write_text(json.dumps(rec, indent=2, default=str))
    if not ddp or distributed.is_main():
        (ctx.store.dir / f"failed-{ctx.store.folder_name(sd.name)}.log").unlink(missing_ok=True)
        ctx.store.write_run_json(recipe_doc, ctx.recipe_path, "running")
    progress.note(f"stage {sd.name}: done in {rec['seconds']:.1f}s")
    return rec


def _join_torchrun(recipe: Recipe) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group before any stage runs."""
    if distributed.world_size() <= 1:
        return False
    from edge_pipeline.stages.distill import pick_device

    distributed.init(pick_device(recipe.distill.device, "distill.device"))
    return True


@contextmanager
def _stage_folder(store: RunStore, stage: str, ddp: bool) -> Iterator[Path]:
    """The store's atomic stage folder; a DDP rank other than 0 writes into a throwaway folder instead."""
    if ddp and not distributed.is_main():
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
    else:
        with store.writing(stage) as tmp:
            yield tmp


def _brief(rec: dict) -> dict:
    return {"seconds": rec.get("seconds"), "metrics": rec.get("metrics", {})}


def _user_code(recipe: Recipe) -> dict:
    """Content hashes of what the teacher is built from: the weights file's bytes and the user's modules."""
    from edge_pipeline.runstore import module_fingerprint, sha256_file

    out = {"model_code": module_fingerprint(recipe.model), "data_code": module_fingerprint(recipe.data)}
    if recipe.weights and Path(recipe.weights).is_file():
        out["weights"] = sha256_file(Path(recipe.weights))
    if recipe.metric not in ("auto", "top1", "top5", "cosine", "sqnr", "max_abs"):
        out["metric_code"] = module_fingerprint(recipe.metric)
    return out


def _pinned_set_hash(recipe: Recipe) -> str | None:
    """A pinned representative set's recorded sha256, so editing the set re-runs everything downstream."""
    if not recipe.calibrate.set:
        return None
    from edge_pipeline.runstore import sha256_file

    npz = Path(recipe.calibrate.set).with_suffix(".npz")
    return sha256_file(npz) if npz.is_file() else None


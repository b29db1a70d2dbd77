"""Sequences the stages: computes each stage's cache key, reuses a stage whose key is unchanged, runs the
rest in order, and records everything in ``run.json``. The stages themselves know nothing of this."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edge_pipeline import capture, distributed, progress
from edge_pipeline.errors import EXIT_UNREACHABLE, BudgetFailure, DevicesUnreachable, PipelineError
from edge_pipeline.recipe import Recipe, load_recipe
from edge_pipeline.runstore import RunStore
from edge_pipeline.stages import Stage, stage_modules, stage_names, stages


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
        batch (outputs it can flatten, input dtypes), the metric, and each enabled stage's own settings."""
        _ = self.metric  # loads the data, builds the model, discovers the interface
        for stage in stages():
            if stage.check is not None and stage.enabled(self.recipe):
                stage.check(self)

    @cached_property
    def data_fingerprint(self) -> str:
        return self.data.fingerprint()

    def stage_dir(self, stage: str) -> Path | None:
        """The folder of an earlier, enabled stage, or None where that stage is disabled."""
        return None if self.keys.get(stage) == "disabled" else self.store.stage_dir(stage)

    def model_dir(self) -> Path:
        """The folder holding the model the current stage works on: that of the last enabled stage before it
        that produces one (distilled, else pruned, else the teacher)."""
        names = stage_names()
        before = names.index(self.current_stage) if self.current_stage in names else len(names)
        for stage in reversed(stages()[:before]):
            if stage.produces_model and (d := self.stage_dir(stage.name)) is not None:
                return d
        raise AssertionError("teacher stage is always enabled")

    def model(self):
        """(model, arch): the model the current stage works on."""
        from edge_pipeline.modelio import load_model

        return load_model(self.model_dir() / "model.pt")

    def teacher(self):
        """(model, arch): the trained teacher."""
        from edge_pipeline.modelio import load_model

        return load_model(self.stage_dir("teacher") / "model.pt")

    def calibration(self) -> tuple:
        """The representative set's inputs (``input_0``, ``input_1``, ...) the calibrate stage drew or checked."""
        from edge_pipeline.harness import runner

        return tuple(runner.load_inputs(str(self.stage_dir("calibrate") / "calibration.npz")))

    def qat_state(self, target: str) -> dict | None:
        """The trained state the qat stage left for this target, or None (no QAT, or not trained)."""
        from edge_pipeline.stages import qat

        return qat.state_for(self.stage_dir("qat"), target)


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
        if val is not None and val not in stage_names():
            raise PipelineError(f"unknown stage '{val}' for {opt}", hint=f"stages: {', '.join(stage_names())}")
    if not run_id or not all(c.isalnum() or c in "-_." for c in run_id) or run_id.startswith("."):
        raise PipelineError(f"bad run id '{run_id}'", hint="use letters, digits, '-', '_' or '.'")
    root = Path(out or recipe.output)
    _check_writable(root, "--out" if out else f"{recipe_path}: output")
    store = RunStore(root, recipe.name, run_id, stage_names())
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
        e.run_dir = store.dir  # the CLI shows that run's targets table above the error
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
    forced_from = 0 if force else (stage_names().index(from_stage) if from_stage else None)

    goal = only or until
    needed = _dependencies(goal) | {goal} if goal else None
    for i, sd in enumerate(stages()):
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
        follower = ddp and not distributed.is_main() and not sd.trains
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
    by_name = {s.name: s for s in stages()}
    out, todo = set(), list(by_name[stage].deps)
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo += by_name[d].deps
    return out


def _run_stage(ctx: Context, sd: Stage, key: str, config: Any, inputs: dict, ddp: bool,
               recipe_doc: dict) -> dict:
    started = time.time()
    with _stage_folder(ctx.store, sd.name, ddp) as tmp, progress.task(f"stage {sd.name}"):
        log = tmp / "log.txt"  # other libraries' output while the stage runs (when the CLI captures it)
        try:
            with capture.to_log(log):
                metrics = next(m for m in stage_modules() if m.STAGE is sd).run(ctx, tmp)
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
    from edge_pipeline.training import pick_device

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

"""The qat stage (between calibrate and lower): quantization-aware training, for int8 targets whose
post-training int8 is not good enough.

Per int8 target: the model lower would ship (distilled, pruned or the teacher) is exported once, prepared with
its backend's ``qat_quantizer`` (``prepare_qat_pt2e``: fake quantizers on weights and activations,
BatchNorm folded into the fake-quantized convs) and trained against the fp32 teacher with the distill stage's
loss (soft targets at its temperature, its alpha on the labels). The usual schedule: BatchNorm statistics
frozen after ``freeze_bn_epoch`` epochs, quantizer ranges after ``freeze_observers_epoch``; the epoch with the
best fake-quantized metric on val is kept. lower rebuilds the same graph, loads the trained state, converts
and lowers it like a post-training build, and ships whichever of the two is better on val.

``mode: auto`` trains only for targets whose post-training build, run in its own runtime, misses
``max_accuracy_drop`` or the parity budget's ``min_top1_agreement`` on val. Targets whose quantizers are
configured alike share one run. A per-epoch checkpoint lets a killed run resume; under torchrun it trains with
DDP like distill.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_pipeline import distributed
from edge_pipeline.backends import backends, get_backend, pt2e
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator, agreement, example_inputs, predict, run_artifact
from edge_pipeline.interface import FlatModel
from edge_pipeline.recipe import QatConfig
from edge_pipeline.stages import Stage
from edge_pipeline.targets import Profile, load_profile, targets_config
from edge_pipeline.training import fit_against_teacher, loss_for, pick_device, seed_everything

STATE_FILE = "qat_state.pt"  # per target folder: the trained prepared graph's state_dict (tensors only)


@dataclass(frozen=True)
class QatResult:
    state: dict[str, torch.Tensor]
    curves: list[dict]  # per epoch: train_loss, val_loss, val_metric (fake-quantized), val_cosine
    best_epoch: int


def quantizer_for(profile: Profile, where: str):
    """The target backend's QAT quantizer, or a clear refusal where the backend has none."""
    backend = get_backend(profile.backend)
    if not backend.BACKEND.qat:
        able = [name for name, b in backends().items() if b.BACKEND.qat]
        raise PipelineError(f"{backend.BACKEND.refusal('qat')} (target {profile.name})", where=where,
                            hint=f"remove the target from QAT (qat.mode: off), or use an int8 target of "
                                 f"{', '.join(able)}")
    return backend.qat_quantizer(profile)


def check_config(recipe, where: str) -> None:
    """Before any work: every int8 target of a QAT run has a QAT quantizer (and a profile it accepts)."""
    if recipe.qat.mode == "off":
        return
    for name in recipe.targets:
        profile = load_profile(name)
        if profile.precision == "int8":
            quantizer_for(profile, f"{where}: qat (target {profile.name})")


def quantizer_key(quantizer) -> str:
    """Quantizers configured alike train the same model: their classes and each spec's dtype, range, scheme
    and fake-quantizer class, as text."""
    inner = getattr(quantizer, "inner", quantizer)
    config = inner.global_config
    specs = []
    for spec in (config.input_activation, config.weight):
        ctr = getattr(getattr(spec.observer_or_fake_quant_ctr, "p", None), "func", spec.observer_or_fake_quant_ctr)
        specs.append(f"{spec.dtype}[{spec.quant_min},{spec.quant_max}]{spec.qscheme}/{getattr(ctr, '__name__', ctr)}")
    return "/".join([type(quantizer).__name__, type(inner).__name__, *specs])


def ptq_val_metric(model: nn.Module, profile: Profile, calibration, ev: Evaluator) -> tuple[float, float | None]:
    """The post-training build of this target, made and run in its own runtime, scored on val; with its top-1
    agreement there with the float model it came from (None without a class output). Agreement is paired (the
    same rows, int8 against float), so it shows an int8 loss that a small val split's metric hides by chance."""
    with tempfile.TemporaryDirectory() as tmp:
        path = get_backend(profile.backend).export(model, example_inputs(ev.data), calibration, profile, Path(tmp),
                                                   ev.iface, fixtures=False)
        outputs = run_artifact(path, ev.data.val, profile.threads)
    top1 = None
    if ev.metric.output:
        paired = agreement(outputs, predict(FlatModel(model), ev.data.val), ev.names)
        top1 = paired["outputs"][ev.metric.output].get("top1_agreement")
    return ev.score_outputs(outputs, "val"), top1


def train(model: nn.Module, teacher: nn.Module, quantizer, calibration, ev: Evaluator, cfg: QatConfig, loss_fn,
          device: str, where: str, resume: Path | None = None, description: str = "QAT") -> QatResult:
    data = ev.data
    seed_everything(cfg.seed)
    prepared, max_batch = pt2e.prepare_qat(FlatModel(model).eval(), calibration, quantizer)
    if max_batch < 2:
        raise PipelineError("the model does not export with a dynamic batch, and QAT trains in batches "
                            "(BatchNorm needs two rows or more)", where=where,
                            hint="make the model's forward independent of the batch size, or set qat.mode: off")
    from torchao.quantization.pt2e import (
        allow_exported_model_train_eval,
        disable_observer,
        move_exported_model_to_train,
    )

    allow_exported_model_train_eval(prepared)  # .train()/.eval() swap BatchNorm and dropout as for a module
    batch = min(cfg.batch_size, max_batch)
    prepared.to(device)
    forward: nn.Module = prepared
    if distributed.world_size() > 1:
        forward = nn.parallel.DistributedDataParallel(prepared)

    def start_epoch(epoch: int) -> None:
        move_exported_model_to_train(prepared)
        if epoch >= cfg.freeze_bn_epoch:
            pt2e.freeze_batch_norm(prepared)
        if epoch >= cfg.freeze_observers_epoch:
            prepared.apply(disable_observer)

    fit = fit_against_teacher(
        prepared, forward, teacher, data, loss_fn, ev, params=prepared.parameters(), epochs=cfg.epochs, lr=cfg.lr,
        weight_decay=0.0, batch_size=batch, warmup_epochs=0, seed=cfg.seed, device=device, description=description,
        resume=resume, start_epoch=start_epoch, min_batch=2,
        # The fake-quantized model as lower will convert it: BatchNorm on running statistics, no dropout.
        val_outputs=lambda: predict(copy.deepcopy(prepared).eval(), data.val, batch_size=batch, device=device))
    return QatResult(fit.best, fit.curves, fit.best_epoch)


def run(ctx, out: Path) -> dict:
    cfg = ctx.recipe.qat
    where = f"{ctx.recipe_path}: qat"
    model, _ = ctx.model()
    teacher, _ = ctx.teacher()
    calibration = ctx.calibration()
    ev = ctx.evaluator
    device = pick_device(cfg.device, f"{where}.device")
    distributed.init(device)
    loss_fn = loss_for(ctx.recipe.distill, ev)
    float_val = ev.score_model(model, "val")
    profiles = [p for p in (load_profile(t) for t in ctx.recipe.targets) if p.precision == "int8"]
    quantizers = {p.name: quantizer_for(p, f"{where} (target {p.name})") for p in profiles}  # refuse before work
    targets: dict[str, dict] = {}
    trained: dict[str, str] = {}  # quantizer key -> the target whose run it is
    for profile in profiles:
        entry: dict = {"backend": profile.backend}
        if cfg.mode == "auto":
            ptq, top1 = ptq_val_metric(model, profile, calibration, ev)
            drop = ev.metric.drop(ptq, float_val)
            budget, min_top1 = profile.budgets.max_accuracy_drop, profile.budgets.parity.min_top1_agreement
            entry |= {"ptq_val_metric": ptq, "ptq_val_drop": drop, "ptq_val_top1_agreement": top1}
            drop_ok = budget is None or drop is None or drop <= budget
            if drop_ok and (top1 is None or top1 >= min_top1):
                targets[profile.name] = {**entry, "trained": False,
                                         "reason": f"post-training int8 meets its budget on val (drop "
                                                   f"{drop if drop is not None else 'n/a'} <= {budget}, top-1 "
                                                   f"agreement {'n/a' if top1 is None else f'{top1:.1%}'})"}
                continue
        key = quantizer_key(quantizers[profile.name])
        folder = out / profile.name
        folder.mkdir(parents=True)
        if key in trained:  # the same fake quantizers: the same training, done once
            (folder / STATE_FILE).write_bytes((out / trained[key] / STATE_FILE).read_bytes())
            targets[profile.name] = {**targets[trained[key]], **entry, "shared_with": trained[key],
                                     "seconds": 0.0}
            continue
        started = time.time()
        resume = ctx.store.dir / f".qat-resume-{ctx.keys['qat'][:16]}-{profile.name}.pt"
        res = train(model, teacher, quantizers[profile.name], calibration, ev, cfg, loss_fn, device,
                    f"{where} (target {profile.name})", resume, description=f"QAT {profile.name}")
        torch.save(res.state, folder / STATE_FILE)
        (folder / "curves.json").write_text(json.dumps(res.curves, indent=1))
        if distributed.is_main():
            resume.unlink(missing_ok=True)
        best = next(c for c in res.curves if c["epoch"] == res.best_epoch)
        targets[profile.name] = {**entry, "trained": True, "epochs_run": len(res.curves),
                                 "best_epoch": res.best_epoch, "fake_quant_val_metric": best["val_metric"],
                                 "seconds": round(time.time() - started, 1)}
        trained[key] = profile.name
    return {"mode": cfg.mode, "device": device, "world_size": distributed.world_size(), "metric": ev.metric.name,
            "float_val_metric": float_val, "targets": targets}


def state_for(qat_dir: Path | None, target: str) -> dict | None:
    """The trained state a QAT run left for this target, or None (no QAT, or the target was not trained)."""
    if qat_dir is None or not (qat_dir / target / STATE_FILE).is_file():
        return None
    return torch.load(qat_dir / target / STATE_FILE, weights_only=True, map_location="cpu")


def _card(q: dict, m: dict) -> str:
    from_qat = [n for n, t in m["targets"].items() if t.get("int8_from") == "qat"]
    return (f"- **qat** ({q['mode']}): quantization-aware training against the teacher; int8 from the trained "
            f"model for {', '.join(from_qat) or 'no target'} (the others calibrated).")


def _summary(m: dict) -> str:
    trained = [t for t, q in m.get("targets", {}).items() if q.get("trained")]
    return f"trained for {', '.join(trained) or 'none'}; mode={m.get('mode')}, device={m.get('device')}"


def _report(folder: Path, metrics: dict, targets: dict) -> str | None:
    """PTQ against QAT per target: the metric on test, size and p50 on the build host, which one ships, and what
    the QAT run cost (epochs, wall time)."""
    import html

    trained = metrics.get("targets", {})
    rows = []
    for name, q in trained.items():
        cmp = targets.get(name, {}).get("qat")
        if cmp is None:  # not trained (auto: PTQ met its budget), or the target failed to lower
            why = q.get("reason") or "no QAT build"
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan=8>{html.escape(why)}</td></tr>")
            continue
        both = (cmp["ptq"], cmp["qat"])
        cells = [name, *(f"{b['test_metric']:.4f}" for b in both), *(f"{b['size_bytes']:,}" for b in both),
                 *(f"{b['host_p50_ms']:.2f}" for b in both)]
        shared = f", shared with {q['shared_with']}" if q.get("shared_with") else ""
        cells += [cmp["shipped"].upper(), f"{q.get('epochs_run', '')} epochs, {q.get('seconds', 0):.0f} s{shared}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<h2>Post-training vs quantization-aware int8</h2><table><tr><th>target</th><th>PTQ test</th>"
            "<th>QAT test</th><th>PTQ bytes</th><th>QAT bytes</th><th>PTQ p50 ms</th><th>QAT p50 ms</th>"
            "<th>ships</th><th>QAT run</th></tr>" + "".join(rows) + "</table><p>p50 on the build host, one "
            "thread; device-test measures the shipped build on each device.</p>")


STAGE = Stage(
    "qat", 4, ("teacher", "prune", "distill", "cluster", "calibrate"),
    lambda r: {**r.qat.model_dump(), **targets_config(r.targets),
               "loss": r.distill.model_dump(include={"alpha", "temperature", "soft_only", "logit_outputs"})},
    lambda r: bool(r.targets) and r.qat.mode != "off", check=lambda ctx: check_config(ctx.recipe, ctx.recipe_path),
    trains=True, command="Quantization-aware training for the int8 targets (qat.mode: on, or auto where PTQ misses).",
    summary=_summary, card=_card, report=_report)

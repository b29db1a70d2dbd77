"""The cluster stage (off by default): k-means weight clustering of the distilled model, then a short
fine-tune of the centres with the distill loss against the unclustered model, resumable after a kill.

What it buys on the runtimes here: none of them computes with a codebook, so a clustered model ships as each
target's usual kind of artifact, as fast, whose weights hold at most 2^b distinct values per layer (lower gives
clustered layers one int8 weight scale per tensor where the backend takes it). What shrinks is the download:
lower records each artifact's size compressed (``describe.json``: ``download``) and the distinct weight values
read back from the file where the backend can read its weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from edge_pipeline import clustering
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import agreement, predict
from edge_pipeline.interface import FlatModel
from edge_pipeline.modelio import save_model
from edge_pipeline.stages import Stage, fmt_metric
from edge_pipeline.training import fit_against_teacher, loss_for, pick_device, seed_everything


def check_config(ctx) -> None:
    cfg, where = ctx.recipe.cluster, ctx.recipe_path
    for name, bits in cfg.layer_bits.items():
        if not 2 <= bits <= 8:
            raise PipelineError(f"cluster.layer_bits['{name}'] is {bits}, not in 2..8",
                                where=f"{where}: cluster.layer_bits", hint="2^bits centres per layer: 4 to 256")
    if ctx.recipe.qat.mode != "off":
        raise PipelineError("cluster and qat cannot both run: quantization-aware training moves every weight "
                            "off its centre", where=f"{where}: qat.mode",
                            hint="set qat.mode: off (post-training int8 keeps the clustered values), or "
                                 "cluster.enabled: false")


def _layer_bits(model, cfg, heads: list[str], where: str) -> dict[str, int]:
    """Bits per layer to cluster: ``layer_bits`` over ``bits``; a layer with no more weights than centres is
    left as it is (nothing to share)."""
    mods = dict(model.named_modules())
    for name in cfg.layer_bits:
        if not isinstance(mods.get(name), clustering.LAYERS):
            raise PipelineError(f"no Conv/Linear layer '{name}' in the model", where=f"{where}: cluster.layer_bits",
                                hint="name layers as in model.named_modules()")
    chosen = clustering.clusterable(model, cfg.skip, heads, cfg.keep_head, where)
    bits = {n: cfg.layer_bits.get(n, cfg.bits) for n in chosen}
    return {n: b for n, b in bits.items() if mods[n].weight.numel() > 2 ** b}


def run(ctx, out: Path) -> dict:
    cfg, ev, data, where = ctx.recipe.cluster, ctx.evaluator, ctx.data, ctx.recipe_path
    seed_everything(cfg.seed)
    teacher, arch = ctx.model()
    model = copy.deepcopy(teacher)
    example = tuple(torch.from_numpy(a[:1]) for a in data.example)
    pairs, heads = clustering.graph_facts(model, example)
    folded = clustering.fold_batch_norms(model.eval(), pairs)
    layer_bits = _layer_bits(model, cfg, heads, where)
    if not layer_bits:
        raise PipelineError("no layer to cluster: every Conv/Linear layer is skipped, an output layer, or has "
                            "no more weights than centres", where=f"{where}: cluster",
                            hint="name fewer layers in cluster.skip, or set keep_head: false")
    before = ev.score_model(teacher, "val")
    layers = clustering.cluster(model, layer_bits, cfg.init, cfg.iterations, cfg.seed)
    clustered_val, clustered_test = ev.score_model(model, "val"), ev.score_model(model, "test")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def keep_norms_frozen(_epoch: int) -> None:  # folded into the convs: an identity only in eval mode
        for m in norms:
            m.eval()

    curves, best_epoch = [], 0
    if cfg.epochs:
        device = pick_device("auto", f"{where}: cluster")
        resume = ctx.store.dir / f".cluster-resume-{ctx.keys['cluster'][:16]}.pt"
        model.to(device)
        fit = fit_against_teacher(
            model, FlatModel(model), teacher.to(device), data, loss_for(ctx.recipe.distill, ev), ev,
            params=clustering.centre_parameters(model), epochs=cfg.epochs, lr=cfg.lr, weight_decay=0.0,
            batch_size=cfg.batch_size, warmup_epochs=0, seed=cfg.seed, device=device, description="cluster fine-tune",
            resume=resume, patience=cfg.patience, start_epoch=keep_norms_frozen,
            val_outputs=lambda: predict(model, data.val, device=device))
        model.load_state_dict(fit.best)
        model.cpu()
        teacher.cpu()
        curves, best_epoch = fit.curves, fit.best_epoch
        resume.unlink(missing_ok=True)
    mods = dict(model.named_modules())
    for name, info in layers.items():  # the centres after the fine-tune
        info["centres_used"] = int(torch.unique(mods[name].weight.detach()).numel())
    clustering.bake(model)
    model.eval()
    save_model(model, arch, out / "model.pt")
    (out / "layers.json").write_text(json.dumps(layers, indent=1))
    if curves:
        (out / "curves.json").write_text(json.dumps(curves, indent=1))
    test = predict(model, data.test)
    most = max(info["centres_used"] for info in layers.values())
    return {"layers": len(layers), "clustered_layers": list(layers),
            "bits": sorted({v["bits"] for v in layers.values()}),
            "batchnorms_folded": len(folded), "max_distinct_weights": most,
            "clustered_weights": int(sum(mods[n].weight.numel() for n in layers)),
            "weights": int(sum(p.numel() for p in model.parameters())),
            "init": cfg.init, "metric": ev.metric.name, "val_metric_before": before,
            "val_metric_clustered": clustered_val, "test_metric_clustered": clustered_test,
            "val_metric": ev.score_model(model, "val"),
            "test_metric": ev.score_outputs(test, "test"), "epochs_run": len(curves), "best_epoch": best_epoch,
            "agreement_with_unclustered": agreement(test, predict(teacher, data.test), ev.names)["worst"]}


def _summary(m: dict) -> str:
    return (f"{m['layers']} layers at {'/'.join(map(str, m['bits']))} bits, val {fmt_metric(m['val_metric_before'])}"
            f" -> {fmt_metric(m['val_metric_clustered'])} clustered -> {fmt_metric(m['val_metric'])} fine-tuned")


STAGE = Stage("cluster", 2.5, ("teacher", "prune", "distill"), lambda r: r.cluster.model_dump(),
              lambda r: r.cluster.enabled, check=check_config, produces_model=True,
              command="Cluster the weights (k-means) and fine-tune the centres.", summary=_summary,
              card=lambda d, m: (f"- **cluster**: {d['layers']} layers k-means clustered to "
                                 f"{'/'.join(map(str, d['bits']))} bits ({d['init']} initialisation; at most "
                                 f"{d['max_distinct_weights']} distinct values per layer), BatchNorm folded first; "
                                 f"test {m.get('metric') or 'metric'} {fmt_metric(d.get('test_metric'))}. The "
                                 f"runtimes compute with dense weights: clustering shrinks the compressed download "
                                 f"(and int8 files by their per-channel weight scales), not the speed."))

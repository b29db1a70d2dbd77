"""``edge-pipeline bench``: what the pipeline buys against each runtime's own default flow, measured in one run.

Per recipe and backend: (1) the fp32 teacher exported as is, (2) the backend's default int8 flow on the
teacher (its quantizer with default settings, calibrated on the same representative set), (3) the pipeline's
output (pruned + distilled + calibrated int8), and (0) the smallest int8 model the format holds (one Linear
layer): its size less its parameters is the format's fixed overhead, its latency the runtime's per-call floor.

Each artifact is timed in ``ROUNDS`` fresh runner processes at 1 thread (pinned to one core) and at all cores,
the rounds interleaved across artifacts so that drift on a shared machine hits every variant alike; a p50 is
the median of the rounds' p50s. Ratios are taken inside this run only. ORT files are built for this machine's platform:
an ORT file optimized for arm runs several times slower on x86 and would measure the mismatch, not the model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline import progress
from edge_pipeline.backends import artifact_bytes, backends, get_backend
from edge_pipeline.devices import LocalDevice, parse_device
from edge_pipeline.modelio import load_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.pipeline import run as run_pipeline
from edge_pipeline.runstore import find_stage
from edge_pipeline.stages import stages
from edge_pipeline.stages.device_test import measure_on_device, write_inputs
from edge_pipeline.targets import host_ort_platform, load_profile, ort_files_for

VARIANTS = ("fp32_teacher", "default_int8_teacher", "pipeline_int8", "format_floor")
RUNS, WARMUP, ROUNDS = 500, 50, 5
MIN_RUNS, SECONDS_PER_MEASURE, MACS_PER_MS = 50, 1.5, 5e7  # big models: fewer timed runs, same rounds

# The targets for (3). A compressing recipe (prune and/or distill) against the fp32 teacher (1):
MAX_SIZE_RATIO, MAX_P50_RATIO, MAX_ACCURACY_LOSS, MAX_OVER_FLOOR = 0.10, 0.25, 0.01, 0.10
# A post-training-only recipe (the model itself unchanged) against fp32 and int8 weights alone:
MIN_TOP1_AGREEMENT, MAX_BELOW_CEILING, MAX_PTQ_P50_RATIO, MAX_BYTES_PER_PARAM, MAX_PTQ_SECONDS = (
    0.95, 0.02, 0.5, 1.10, 300)


class FloorModel(nn.Module):
    """The smallest model with the same interface: the first input's mean, through one Linear layer per output
    (a Linear from the whole input would itself be big: 150M parameters for a 224x224 RGB image)."""

    def __init__(self, iface):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Linear(1, int(np.prod(o.shape))) for o in iface.outputs)
        self.shapes = [o.shape for o in iface.outputs]

    def forward(self, *inputs):
        x = inputs[0].float().flatten(1).mean(1, keepdim=True)
        return tuple(h(x).reshape(-1, *s) for h, s in zip(self.heads, self.shapes, strict=True))


def timed_runs(macs: int) -> int:
    """Timed runs per measurement: RUNS for small models, fewer for big ones (about SECONDS_PER_MEASURE each)."""
    return int(min(RUNS, max(MIN_RUNS, SECONDS_PER_MEASURE * 1000 / max(macs / MACS_PER_MS, 1e-3))))


def _measure(artifact: Path, test_x: Path, threads: int, runs: int) -> tuple[dict, np.ndarray]:
    device = LocalDevice(parse_device("local"), timeout=600)
    try:
        return measure_on_device(device, artifact, test_x, threads, runs, min(WARMUP, runs), pin=True)
    finally:
        device.close()


def _timed_rounds(artifacts: dict, test_x: Path, thread_counts: list[int], runs: int, task) -> tuple[dict, dict]:
    """{key: {threads: [runner result per round]}} and the outputs of each artifact's first run."""
    results: dict = {k: {t: [] for t in thread_counts} for k in artifacts}
    outputs: dict = {}
    for _ in range(ROUNDS):
        for key, artifact in artifacts.items():
            for t in thread_counts:
                res, out = _measure(artifact, test_x, t, runs)
                results[key][t].append(res)
                outputs.setdefault(key, out)
                task.advance()
    return results, outputs


def _summary(rounds: list[dict]) -> dict:
    p50s = [r["latency"]["p50_ms"] for r in rounds]
    return {"p50_ms": statistics.median(p50s), "p50_ms_rounds": p50s,
            "cv": statistics.median(r["latency"]["cv"] for r in rounds),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)}


def _target(name: str, value: float, met: bool, **extra) -> dict:
    return {"target": name, "value": value, "met": bool(met), **extra}


def check_targets(by: dict, ptq_only: bool = False, ceiling: float | None = None,
                  pipeline_seconds: float | None = None) -> list[dict]:
    """The targets for the pipeline's output (3) against the fp32 teacher (1) and the runtime's default flow (2).
    A compressing recipe is held to size and speed ratios; a post-training-only one (the model unchanged) to
    agreement with fp32, to the ceiling int8 weights alone reach, to bytes per parameter and to wall time."""
    teacher, default, ours, floor = (by[v] for v in VARIANTS)
    ratio = ours["ratio_to_fp32"]
    p50_floor = floor["threads_1"]["p50_ms"] / teacher["threads_1"]["p50_ms"]
    eps = 1e-9
    common = [_target("test metric (3) >= (2)", ours["test_metric"],
                      ours["test_metric"] >= default["test_metric"] - eps)]
    if not ptq_only:
        floor_bytes = ours["params"] + floor["format_overhead_bytes"]
        return [
            _target(f"size (3)/(1) <= {MAX_SIZE_RATIO}", ratio["size"], ratio["size"] <= MAX_SIZE_RATIO),
            _target(f"p50 1 thread (3)/(1) <= {MAX_P50_RATIO}", ratio["p50_1_thread"],
                    ratio["p50_1_thread"] <= MAX_P50_RATIO, floor=p50_floor),
            _target(f"test metric (3) >= (1) - {MAX_ACCURACY_LOSS}", ours["test_metric"],
                    ours["test_metric"] >= teacher["test_metric"] - MAX_ACCURACY_LOSS - eps),
            *common,
            _target(f"size (3) <= {1 + MAX_OVER_FLOOR:.2f} x (1 B/param + format overhead)",
                    ours["size_bytes"] / floor_bytes, ours["size_bytes"] <= (1 + MAX_OVER_FLOOR) * floor_bytes)]
    top1 = ours["agreement"].get("top1_agreement")
    targets = [
        _target(f"top-1 agreement (3) with fp32 >= {MIN_TOP1_AGREEMENT}", top1 if top1 is not None else float("nan"),
                top1 is not None and top1 >= MIN_TOP1_AGREEMENT),
        _target(f"test metric (3) >= int8-weights-only ceiling - {MAX_BELOW_CEILING}", ours["test_metric"],
                ceiling is not None and ours["test_metric"] >= ceiling - MAX_BELOW_CEILING - eps, ceiling=ceiling),
        *common,
        _target(f"p50 1 thread (3)/(1) <= {MAX_PTQ_P50_RATIO}", ratio["p50_1_thread"],
                ratio["p50_1_thread"] <= MAX_PTQ_P50_RATIO, floor=p50_floor),
        _target(f"bytes per parameter (3) <= {MAX_BYTES_PER_PARAM}", ours["bytes_per_param"],
                ours["bytes_per_param"] <= MAX_BYTES_PER_PARAM)]
    if pipeline_seconds is not None:
        targets.append(_target(f"pipeline wall time (every stage to the device test) <= {MAX_PTQ_SECONDS} s",
                               pipeline_seconds,
                               pipeline_seconds <= MAX_PTQ_SECONDS))
    return targets


def method_study(teacher: nn.Module, example, calibration, ev, tmp: Path) -> dict:
    """Every calibration method each backend offers, on the fp32 teacher with the same representative set:
    {backend: {method: {test_metric, top1_agreement, cosine, size_bytes, seconds}}}. The production stage
    uses the method its profile names; this is where the choice is measured (batch 1, this machine)."""
    from edge_pipeline.evaluation import run_artifact

    out: dict = {}
    methods = {name: b.BACKEND.calibration_methods for name, b in backends().items()}
    with progress.task("bench: calibration methods", total=sum(len(m) for m in methods.values())) as task:
        for backend, names in methods.items():
            base = load_profile(backends()[backend].BACKEND.targets[0])
            for method in names:
                task.advance(0, f"{backend} {method}")
                profile = base.model_copy(update={"quantization": base.quantization.model_copy(
                    update={"method": method})})
                folder = tmp / f"method-{backend}-{method}"
                folder.mkdir()
                started = time.perf_counter()
                try:
                    path = get_backend(backend).export(teacher, example, calibration, profile, folder, ev.iface,
                                                       fixtures=False)
                except Exception as e:  # noqa: BLE001 - a method a model cannot take is a row, not a crash
                    out.setdefault(backend, {})[method] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    task.advance()
                    continue
                seconds = time.perf_counter() - started
                figures = ev.figures(run_artifact(path, ev.data.test), "test")
                worst = figures["agreement_with_teacher"]["worst"]
                out.setdefault(backend, {})[method] = {
                    "test_metric": figures["test_metric"], "top1_agreement": worst.get("top1_agreement"),
                    "cosine": worst["cosine"], "size_bytes": artifact_bytes(path), "export_seconds": seconds}
                task.advance()
    return out


def _fallback_words(ours: dict) -> str:
    fb = ours.get("fallback") or {}
    why = fb.get("not_tried") or fb.get("unsupported")
    dynamic = "; activations quantized per inference" if ours.get("activations") == "dynamic" else ""
    return (f"{', '.join(ours.get('float_layers') or []) or 'none'} ({ours.get('fallback_exports') or 1} "
            f"export(s){'; ' + why if why else ''}{dynamic})")


def _shipped(lower: dict, backend: str) -> dict:
    """The int8 target lower shipped for this backend (its artifact, float layers and fallback), or {}."""
    return next((t for t in lower["targets"].values()
                 if t.get("backend") == backend and t.get("precision") == "int8" and "artifact" in t), {})


def bench_recipe(recipe_path: str, out_root: Path) -> dict:
    # ORT files for this machine (as lower ships them for an x86 target): one optimized for arm runs several
    # times slower here, and one quantized for arm overflows in x86's int8 kernels (see reduces_range).
    with ort_files_for(host_ort_platform()):
        return _bench_recipe(recipe_path, out_root)


def _bench_recipe(recipe_path: str, out_root: Path) -> dict:
    from edge_pipeline.device_testing import evaluator_for_run
    from edge_pipeline.evaluation import example_inputs
    from edge_pipeline.harness import runner
    from edge_pipeline.interface import FlatModel

    # Up to the device test: a recipe whose targets miss their budgets still gets measured (package would refuse).
    summary = run_pipeline(recipe_path, out=out_root, until="device-test")
    run_dir = summary.run_dir
    recipe = summary.run_json["recipe"]
    lower_dir, lower_record = find_stage(run_dir, "lower")
    lower = lower_record["metrics"]
    ev = evaluator_for_run(run_dir)
    data, iface = ev.data, ev.iface
    teacher = FlatModel(ev.teacher)
    model_stage = next(r for s in reversed(stages()) if s.produces_model and (r := find_stage(run_dir, s.name)))
    student, _ = load_model(model_stage[0] / "model.pt")
    calibration = tuple(runner.load_inputs(str(find_stage(run_dir, "calibrate")[0] / "calibration.npz")))
    example = example_inputs(data)
    models = {"fp32_teacher": teacher, "default_int8_teacher": teacher, "pipeline_int8": student,
              "format_floor": FlatModel(FloorModel(iface))}
    stats = {v: model_stats(m, data.example) for v, m in models.items()}
    runs = timed_runs(stats["fp32_teacher"]["macs"])
    float_metric = ev.score_outputs(ev.reference("test"), "test")
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores})
    host = host_ort_platform()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        with progress.task(f"bench {recipe['name']}: export", total=len(backends()) * len(VARIANTS)) as task:
            for backend, mod in backends().items():
                for variant in VARIANTS:
                    task.advance()
                    if variant == "pipeline_int8":
                        shipped = _shipped(lower, backend)
                        if shipped:
                            artifacts[backend, variant] = lower_dir / shipped["artifact"]
                            continue
                    int8_target, fp32_target = mod.BACKEND.targets
                    profile = load_profile(fp32_target if variant == "fp32_teacher" else int8_target)
                    folder = Path(tmp) / f"{backend}-{variant}"
                    folder.mkdir()
                    artifacts[backend, variant] = mod.export(
                        models[variant], example, calibration, profile, folder, iface,
                        default_flow=variant == "default_int8_teacher", fixtures=False)
        methods = method_study(teacher, example, calibration, ev, Path(tmp))
        test_x = Path(tmp) / "test.npz"
        write_inputs(test_x, data.test)
        with progress.task(f"bench {recipe['name']}: time", total=ROUNDS * len(artifacts) * len(thread_counts)) as task:
            timed, outputs = _timed_rounds(artifacts, test_x, thread_counts, runs, task)
        by_backend: dict = {}
        for (backend, variant), artifact in artifacts.items():
            size, params = artifact_bytes(artifact), stats[variant]["params"]
            figures = ev.figures(outputs[backend, variant], "test")
            row = {"size_bytes": size, **stats[variant], "bytes_per_param": size / params,
                   "metric": ev.metric.name, "test_metric": figures["test_metric"],
                   "agreement": figures["agreement_with_teacher"]["worst"], "artifact": artifact.name,
                   **{f"threads_{t}": _summary(timed[backend, variant][t]) for t in thread_counts}}
            if variant == "format_floor":
                row["format_overhead_bytes"] = size - params
            by_backend.setdefault(backend, {})[variant] = row
    for by in by_backend.values():
        base = by["fp32_teacher"]
        for variant in VARIANTS[1:]:
            by[variant]["ratio_to_fp32"] = {
                "size": by[variant]["size_bytes"] / base["size_bytes"],
                **{("p50_1_thread" if t == 1 else f"p50_{t}_threads"):
                   by[variant][f"threads_{t}"]["p50_ms"] / base[f"threads_{t}"]["p50_ms"] for t in thread_counts}}
    stage_seconds = {s: r.get("seconds") for s, r in summary.run_json["stages"].items()}
    ptq_only = not (recipe["prune"]["enabled"] or recipe["distill"]["enabled"])
    ceiling = lower["float"].get("int8_weights_only_test_metric")
    for backend, by in by_backend.items():
        shipped = _shipped(lower, backend)
        by["pipeline_int8"]["float_layers"] = shipped.get("float_layers", [])
        by["pipeline_int8"]["fallback_exports"] = shipped.get("fallback_exports", 1) if shipped else None
        by["pipeline_int8"]["fallback"] = shipped.get("fallback")
        by["pipeline_int8"]["targets"] = check_targets(by, ptq_only, ceiling,
                                                       sum(v for v in stage_seconds.values() if v is not None))
    return {"recipe": recipe["name"], "data": recipe["data"], "model": recipe["model"], "backends": by_backend,
            "metric": ev.metric.name, "float_test_metric": float_metric, "int8_weights_only_test_metric": ceiling,
            "ptq_only": ptq_only, "timed_runs": runs, "test_rows": len(data.test),
            "stage_seconds": stage_seconds, "cores": cores, "ort_platform": host, "calibration_methods": methods,
            "qat": qat_summary(run_dir, lower)}


INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # int8 dot-product instructions


def int8_features() -> list[str]:
    """The int8 dot-product instructions /proc/cpuinfo lists (x86: VNNI, AMX; arm: dot product, i8mm): int8
    pays off much more where they exist, so every latency ratio is read beside them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in INT8_FEATURES if f in flags]


def machine() -> dict:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "int8_features": int8_features(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "date": time.strftime("%Y-%m-%d")}


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def to_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Benchmarks", "",
             f"Measured by `edge-pipeline bench` on {m['date']}: {m['cpu']} ({m['arch']}), {m['cores']} cores, "
             f"int8 dot-product instructions: {', '.join(m.get('int8_features') or []) or 'none'}, "
             f"{m['os']}, Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}. Each artifact "
             f"was timed in {ROUNDS} fresh runner processes, interleaved with the other artifacts (up to {RUNS} "
             f"timed runs after up to {WARMUP} warm-up each, batch 1, fewer for big models: see each recipe); a p50 "
             f"is the median of the {ROUNDS} rounds' p50s. Compare ratios, not absolute times, across machines.", "",
             "(1) fp32 teacher as exported; (2) the backend's own default int8 flow on the teacher, calibrated on "
             "the same representative set; (3) the artifact the pipeline's lower stage shipped (its float layers "
             "included): pruned + distilled + calibrated int8, or calibrated int8 alone for a post-training recipe; "
             "(0) the format's floor: the input's mean through one Linear layer per output, whose size less its "
             "parameters is the format's fixed overhead and whose p50 is the runtime's per-call floor. ORT files "
             "are built for this machine's platform.", ""]
    for r in doc["recipes"]:
        c = r["cores"]
        kind = ("post-training int8 only" if r.get("ptq_only") and not r.get("qat") else
                "int8 with quantization-aware training" if r.get("qat") else "pruned + distilled + int8")
        lines += [f"## {r['recipe']} (`{r['model']}` on `{r['data']}`, {kind})", ""]
        rm = r.get("machine", m)
        if (rm["date"], rm["cpu"]) != (m["date"], m["cpu"]):
            lines += [f"Measured by an earlier bench run on {rm['date']}: {rm['cpu']}, torch {rm['torch']}.", ""]
        lines += [f"{r.get('test_rows', '?')} test rows; {r.get('timed_runs', RUNS)} timed runs per measurement. "
                  f"fp32 test {r['metric']}: {_fmt(r['float_test_metric'])}; int8 weights alone (per-channel, "
                  f"activations fp32), the ceiling: {_fmt(r.get('int8_weights_only_test_metric'))}.", "",
                  f"| backend | variant | size B | B/param | params | MACs | p50 ms 1 thr | p50 ms {c} thr | CV 1 thr "
                  f"| peak RSS MB | test {r.get('metric', 'metric')} | top-1 agree fp32 | cosine vs fp32 | size ×(1) "
                  f"| p50 1 thr ×(1) | p50 {c} thr ×(1) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for backend, by in r["backends"].items():
            for variant, v in by.items():
                ratio = v.get("ratio_to_fp32", {})
                t1, tn = v["threads_1"], v[f"threads_{c}"]
                lines.append(
                    f"| {backend} | {variant} | {v['size_bytes']} | {v['bytes_per_param']:.2f} | {v['params']} | "
                    f"{v['macs']} | {t1['p50_ms']:.4f} | {tn['p50_ms']:.4f} | {t1['cv']:.2f} | "
                    f"{t1['peak_rss_bytes'] / 2**20:.0f} | {_fmt(v['test_metric'])} | "
                    f"{_fmt(v['agreement'].get('top1_agreement'))} | {v['agreement']['cosine']:.4f} | "
                    f"{ratio.get('size', 1):.3f} | {ratio.get('p50_1_thread', 1):.3f} | "
                    f"{ratio.get(f'p50_{c}_threads', 1):.3f} |")
        lines += ["", "Float fallback of (3): " + "; ".join(
            f"{b}: {_fallback_words(by['pipeline_int8'])}" for b, by in r["backends"].items()) + ".",
            "", "Targets for (3):", "", "| backend | target | value | met |", "|---|---|---|---|"]
        for backend, by in r["backends"].items():
            for t in by["pipeline_int8"]["targets"]:
                note = f" (format floor alone: {t['floor']:.3f})" if "floor" in t else ""
                met = "yes" if t["met"] else "NO"
                lines.append(f"| {backend} | {t['target']} | {_fmt(t['value'])}{note} | {met} |")
        if r.get("calibration_methods"):
            lines += ["", "Calibration methods (int8 teacher, same representative set; the targets' profiles use "
                      "minmax):", "", f"| backend | method | test {r.get('metric', 'metric')} | top-1 agree fp32 | "
                      "cosine vs fp32 | size B | export s |", "|---|---|---|---|---|---|---|"]
            for backend, by_method in r["calibration_methods"].items():
                for method, v in by_method.items():
                    lines.append(f"| {backend} | {method} | " + (f"error: {v['error']} | | | | |" if "error" in v else
                                 f"{_fmt(v['test_metric'])} | {_fmt(v['top1_agreement'])} | {v['cosine']:.4f} | "
                                 f"{v['size_bytes']} | {v['export_seconds']:.1f} |"))
        if r.get("qat"):
            lines += _qat_lines(r)
        secs = ", ".join(f"{s} {v:.1f} s" for s, v in r["stage_seconds"].items() if v is not None)
        lines += ["", f"Pipeline wall time per stage (this run or the run it reused): {secs}.", ""]
    return "\n".join(lines) + "\n"


def _qat_lines(r: dict) -> list[str]:
    fp32 = r["qat"]["float_test_metric"]
    lines = ["", f"Post-training (PTQ) vs quantization-aware (QAT) int8 of the shipped targets, from the pipeline's "
             f"own run: fp32 test {r['metric']} {_fmt(fp32)}; qat stage {r['qat']['stage_seconds']:.0f} s on "
             f"{r['cores']} cores (device {r['qat']['device']}). p50 on this host, 1 thread, 30 runs.", "",
             "| target | PTQ test | QAT test | QAT − fp32 | within 0.5 pt | PTQ B | QAT B | PTQ p50 ms | QAT p50 ms "
             "| ships | QAT run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in r["qat"]["targets"].items():
        if "ptq" not in t:
            lines.append(f"| {name} | {t.get('reason', 'no QAT build')} |||||||||||")
            continue
        p, q = t["ptq"], t["qat"]
        gap = q["test_metric"] - fp32
        run = f"{t['epochs_run']} epochs, {t['seconds']:.0f} s" + (f", shared with {t['shared_with']}"
                                                                 if t.get("shared_with") else "")
        lines.append(f"| {name} | {_fmt(p['test_metric'])} | {_fmt(q['test_metric'])} | {gap:+.4f} | "
                     f"{'yes' if gap >= -0.005 else 'NO'} | {p['size_bytes']} | {q['size_bytes']} | "
                     f"{p['host_p50_ms']:.3f} | {q['host_p50_ms']:.3f} | {t['shipped'].upper()} | {run} |")
    return lines


def qat_summary(run_dir: Path, lower: dict) -> dict | None:
    """PTQ vs QAT per target of a run with a qat stage: what lower measured of both builds and what QAT cost."""
    rec = find_stage(run_dir, "qat")
    if rec is None:
        return None
    q = rec[1]["metrics"]
    targets = {}
    for name, t in q["targets"].items():
        shipped = lower["targets"].get(name, {}).get("qat")
        targets[name] = {**t, **shipped} if shipped else t
    return {"float_test_metric": lower["float"]["test_metric"], "stage_seconds": rec[1]["seconds"],
            "device": q["device"], "targets": targets}


def bench(recipes: list[str], out_md: Path, out_root: Path = Path("runs"), merge: bool = False) -> dict:
    """``merge``: the recipes benched now replace their sections of the earlier JSON beside ``out_md``; the
    others stay, each with the machine and date it was measured on (ratios compare only inside one section)."""
    here = machine()
    fresh = [{**bench_recipe(r, out_root), "machine": here} for r in recipes]
    kept = []
    if merge and out_md.with_suffix(".json").is_file():
        earlier = json.loads(out_md.with_suffix(".json").read_text())
        names = {r["recipe"] for r in fresh}
        kept = [{"machine": earlier["machine"], **r} for r in earlier["recipes"] if r["recipe"] not in names]
    doc = {"machine": here, "recipes": kept + fresh}
    out_md.write_text(to_markdown(doc))
    out_md.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return doc

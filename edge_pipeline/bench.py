"""``edge-pipeline bench``: what the pipeline buys against each runtime's own default flow, measured in one run.

Per recipe and backend: (1) the fp32 teacher exported as is, (2) the backend's default int8 flow on the
teacher (its quantizer with default settings, calibrated on the same representative set), (3) the pipeline's
output (pruned + distilled + calibrated int8). Each is measured in a fresh runner process on this machine at
1 thread and at all cores; ratios are taken inside this run only.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_pipeline import progress
from edge_pipeline.backends import get_backend
from edge_pipeline.devices import LocalDevice, parse_device
from edge_pipeline.modelio import load_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.pipeline import run as run_pipeline
from edge_pipeline.runstore import find_stage
from edge_pipeline.sources import load_data
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile
from edge_pipeline.training import agreement, predict, top1

PROFILES = {"executorch": "executorch-xnnpack", "onnxruntime": "ort-mobile", "tflite": "tflite"}
RUNS, WARMUP = 200, 20


def _measure(artifact: Path, data, teacher_test: np.ndarray, threads: int) -> dict:
    device = LocalDevice(parse_device("local"), timeout=600)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / "test.npz"
            np.savez(inputs, x=data.test.x)
            res, outputs = measure_on_device(device, artifact, inputs, threads, RUNS, WARMUP)
    finally:
        device.close()
    return {"p50_ms": res["latency"]["p50_ms"], "cv": res["latency"]["cv"], "peak_rss_bytes": res["peak_rss_bytes"],
            "test_accuracy": top1(outputs, data.test.y), "agreement": agreement(outputs, teacher_test)}


def bench_recipe(recipe_path: str, out_root: Path) -> dict:
    summary = run_pipeline(recipe_path, out=out_root, until="lower")
    run_dir = summary.run_dir
    recipe = summary.run_json["recipe"]
    data = load_data(recipe["data"])
    teacher, _ = load_model(find_stage(run_dir, "teacher")[0] / "model.pt")
    model_stage = find_stage(run_dir, "distill") or find_stage(run_dir, "prune") or find_stage(run_dir, "teacher")
    student, _ = load_model(model_stage[0] / "model.pt")
    calibration = np.load(find_stage(run_dir, "calibrate")[0] / "calibration.npz")["x"]
    teacher_test = predict(teacher, data.test.x)
    example = torch.from_numpy(data.test.x[:1])
    stats = {"teacher": model_stats(teacher, data.input_shape), "pipeline": model_stats(student, data.input_shape)}
    cores = os.cpu_count() or 1
    backends = {}
    variants = [(b, v) for b in PROFILES for v in ("fp32_teacher", "default_int8_teacher", "pipeline_int8")]
    with progress.task(f"bench {recipe['name']}", total=len(variants)) as task, tempfile.TemporaryDirectory() as tmp:
        for backend, variant in variants:
            profile = load_profile(f"{PROFILES[backend]}-{'fp32' if variant == 'fp32_teacher' else 'int8'}")
            model = student if variant == "pipeline_int8" else teacher
            folder = Path(tmp) / f"{backend}-{variant}"
            folder.mkdir()
            artifact = get_backend(backend).export(model, example, calibration, profile, folder,
                                                   default_flow=variant == "default_int8_teacher")
            params = stats["pipeline" if variant == "pipeline_int8" else "teacher"]
            row = {"size_bytes": artifact.stat().st_size, **params,
                   "bytes_per_param": artifact.stat().st_size / params["params"],
                   "threads_1": _measure(artifact, data, teacher_test, 1),
                   f"threads_{cores}": _measure(artifact, data, teacher_test, cores)}
            backends.setdefault(backend, {})[variant] = row
            task.advance()
    for v in backends.values():
        base = v["fp32_teacher"]
        for variant in ("default_int8_teacher", "pipeline_int8"):
            v[variant]["ratio_to_fp32"] = {
                "size": v[variant]["size_bytes"] / base["size_bytes"],
                "p50_1_thread": v[variant]["threads_1"]["p50_ms"] / base["threads_1"]["p50_ms"],
                f"p50_{cores}_threads": v[variant][f"threads_{cores}"]["p50_ms"] / base[f"threads_{cores}"]["p50_ms"],
            }
    stage_seconds = {s: r.get("seconds") for s, r in summary.run_json["stages"].items()}
    return {"recipe": recipe["name"], "data": recipe["data"], "model": recipe["model"], "backends": backends,
            "stage_seconds": stage_seconds, "cores": cores}


def machine() -> dict:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "date": time.strftime("%Y-%m-%d")}


def to_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Benchmarks", "",
             f"Measured by `edge-pipeline bench` on {m['date']}: {m['cpu']}, {m['cores']} cores, {m['os']}, "
             f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}. Each figure is from one "
             f"run on that machine ({RUNS} timed runs after {WARMUP} warm-up, batch 1, a fresh runner process); "
             "compare ratios, not absolute times, across machines.", "",
             "(1) fp32 teacher as exported; (2) the backend's own default int8 flow on the teacher, calibrated on "
             "the same representative set; (3) the pipeline: pruned + distilled + calibrated int8.", ""]
    for r in doc["recipes"]:
        c = r["cores"]
        lines += [f"## {r['recipe']} (`{r['model']}` on `{r['data']}`)", "",
                  f"| backend | variant | size B | B/param | params | MACs | p50 ms 1 thr | p50 ms {c} thr | CV 1 thr "
                  f"| peak RSS MB | test acc | agree teacher | size ×(1) | p50 1 thr ×(1) | p50 {c} thr ×(1) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for backend, by in r["backends"].items():
            for variant, v in by.items():
                ratio = v.get("ratio_to_fp32", {})
                t1, tn = v["threads_1"], v[f"threads_{c}"]
                lines.append(
                    f"| {backend} | {variant} | {v['size_bytes']} | {v['bytes_per_param']:.2f} | {v['params']} | "
                    f"{v['macs']} | {t1['p50_ms']:.4f} | {tn['p50_ms']:.4f} | {t1['cv']:.2f} | "
                    f"{t1['peak_rss_bytes'] / 2**20:.0f} | {t1['test_accuracy']:.4f} | "
                    f"{t1['agreement']['top1_agreement']:.4f} | {ratio.get('size', 1):.3f} | "
                    f"{ratio.get('p50_1_thread', 1):.3f} | {ratio.get(f'p50_{c}_threads', 1):.3f} |")
        secs = ", ".join(f"{s} {v:.1f} s" for s, v in r["stage_seconds"].items() if v is not None)
        lines += ["", f"Pipeline wall time per stage (this run or the run it reused): {secs}.", ""]
    return "\n".join(lines) + "\n"


def bench(recipes: list[str], out_md: Path, out_root: Path = Path("runs")) -> dict:
    doc = {"machine": machine(), "recipes": [bench_recipe(r, out_root) for r in recipes]}
    out_md.write_text(to_markdown(doc))
    out_md.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return doc

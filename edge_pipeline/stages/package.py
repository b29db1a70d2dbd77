"""The package stage: the release bundle ``dist/<name>-<version>/``, its byte-reproducible ``.tar.gz``, and beside it
what was measured of that archive.

Built from a finished run folder alone (its stage folders and their stage.json), so ``edge-pipeline package
RUN`` works on any completed run. The archive holds only what is built: artifacts with their describe.json,
golden inputs and each artifact's outputs on them (``verify`` re-runs the models anywhere), the model card and
a manifest of build facts and the sha256 of every file. Two builds of one recipe give the same archive.
What is measured anew at each test (device latency, memory, accuracy on devices, pass/fail against the
budgets, stage timings) goes to ``<name>-<version>.measurements.json`` and ``<name>-<version>.report.html``
beside the archive, each naming the archive's sha256.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from edge_pipeline.errors import BudgetFailure, DevicesUnreachable, PipelineError
from edge_pipeline.evaluation import run_artifact
from edge_pipeline.runstore import find_stage, sha256_file, toolchain_versions
from edge_pipeline.stages import Stage, fmt_metric, stages

MANIFEST_SCHEMA = 2
MEASUREMENTS_SCHEMA = 1
TIMING_KEYS = {"seconds"}  # stage metrics that time the build: measurements, not build facts
SKIP_IN_TARGET = {"build"}



def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def missing_parts(run_dir: Path, recipe: dict, lower_targets: dict, device_results: dict | None) -> list[str]:
    """What a release of this run would lack: device figures the recipe asked for and never got."""
    devices = recipe.get("devices") or []
    if not (recipe.get("device_test") or {}).get("enabled", True) or not devices:
        return []
    if device_results is None:
        return ["the device test never finished: no device figures"]
    return [f"{t} has no figures from device {d}" for t, tm in lower_targets.items() if "artifact" in tm
            for d in devices if d not in device_results.get(t, {}) or device_results[t][d].get("unreachable")]


def build_bundle(run_dir: Path, version: str, out: Path, allow_failing: bool = False,
                 recipe: dict | None = None, allow_incomplete: bool = False) -> dict:
    """Write the bundle's content into ``out`` (an empty folder); returns the manifest."""
    from edge_pipeline.harness import runner
    from edge_pipeline.sources.data import ArraySplit

    lower = find_stage(run_dir, "lower")
    if lower is None:
        raise PipelineError(f"{run_dir} has no completed lower stage to package", where=str(run_dir),
                            hint="run the recipe with targets first")
    lower_dir, lower_rec = lower
    run_doc = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    recipe = recipe or run_doc.get("recipe", {})
    name = recipe.get("name") or run_dir.parent.name
    dev = find_stage(run_dir, "device-test")
    device_results = dev[1]["metrics"]["results"] if dev else {}
    incomplete = missing_parts(run_dir, recipe, lower_rec["metrics"]["targets"], device_results if dev else None)
    unreachable = dev[1]["metrics"].get("unreachable_devices", {}) if dev else {}
    if incomplete and unreachable and not allow_incomplete:
        raise DevicesUnreachable(f"no bundle: device(s) {', '.join(unreachable)} could not be reached, so the run "
                                 f"has no figures from them ({next(iter(unreachable.values())).splitlines()[0]})",
                                 where=str(run_dir), hint="check the device and run again (finished stages are "
                                 "reused), or package anyway with --allow-incomplete (recorded in the manifest)")
    if incomplete and not allow_incomplete:
        raise PipelineError(f"the run is incomplete: {'; '.join(incomplete)}", where=str(run_dir),
                            hint="run edge-pipeline test on it first, or package anyway with --allow-incomplete "
                                 "(recorded in the manifest)")
    failed_build = sorted(lower_rec["metrics"]["failed_targets"])
    failed_devices = sorted(dev[1]["metrics"]["failed_targets"] if dev else [])
    failed = sorted({*failed_build, *failed_devices})
    if failed and not allow_failing:
        raise BudgetFailure(f"targets failed their budgets or checks: {', '.join(failed)}", where=str(run_dir),
                            hint="fix them, or package anyway with --allow-failing (recorded in the manifest)")

    golden = ArraySplit(tuple(runner.load_inputs(str(lower_dir / "golden.npz"))), None)
    (out / "golden").mkdir()
    shutil.copy(lower_dir / "golden.npz", out / "golden" / "inputs.npz")
    targets, devices = {}, {}
    for tname, tm in lower_rec["metrics"]["targets"].items():
        if "artifact" not in tm:
            continue
        shutil.copytree(lower_dir / tname, out / tname,
                        ignore=lambda d, names: [n for n in names if n in SKIP_IN_TARGET])
        runner.save_outputs(str(out / "golden" / f"{tname}.npz"), run_artifact(out / tm["artifact"], golden))
        targets[tname] = {
            "backend": tm["backend"], "precision": tm["precision"], "artifact": tm["artifact"],
            "io": {k: tm["describe"].get(k) for k in ("inputs", "outputs", "quantized_io")},
            "float_layers": tm.get("float_layers", []),
            # int8 from a calibrated (post-training) build or from the qat stage's trained model
            "int8_from": None if tm["precision"] != "int8" else (tm.get("qat") or {}).get("shipped", "ptq"),
            "lower": {k: tm.get(k) for k in ("size_bytes", "metric", "test_metric", "metric_drop", "failures")}
            | {"parity": tm.get("parity", {}).get("worst")},
        }
        devices[tname] = {d: _device_brief(m) for d, m in device_results.get(tname, {}).items()}
    teacher = find_stage(run_dir, "teacher")
    teacher_metrics = teacher[1]["metrics"] if teacher else {}
    classes = teacher_metrics.get("classes")
    if classes:
        (out / "labels.txt").write_text("\n".join(classes) + "\n")
    cal = find_stage(run_dir, "calibrate")
    # the stages that made the model (lower's figures are the targets'; device-test's are beside the archive)
    lower_order = next(st.order for st in stages() if st.name == "lower")
    stages_doc = {st.name: without_timings(rec["metrics"]) for st in stages() if st.order < lower_order
                  if (r := find_stage(run_dir, st.name)) for rec in [r[1]]}
    manifest = {
        "schema": MANIFEST_SCHEMA, "name": name, "version": version, "targets": targets,
        "failed_targets": failed_build, "allow_failing": bool(failed) and allow_failing, "incomplete": incomplete,
        "recipe": recipe, "calibration_sha256": cal[1]["metrics"]["sha256"] if cal else None,
        "interface": teacher_metrics.get("interface"), "preprocessing": teacher_metrics.get("preprocessing"),
        "metric": teacher_metrics.get("metric"),
        "stages": stages_doc, "toolchain": run_doc.get("toolchain") or toolchain_versions(),
        "git_commit": _git_commit(), "not_byte_reproducible": not_byte_reproducible(lower_rec["metrics"]["targets"]),
    }
    manifest = without_build_paths(manifest, Path(run_doc.get("recipe_path") or ".").absolute().parent)
    (out / "MODEL_CARD.md").write_text(model_card(manifest))
    manifest["files"] = file_table(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    measurements = {"schema": MEASUREMENTS_SCHEMA, "name": name, "version": version, "devices": devices,
                    "failed_targets": failed_devices, "unreachable_devices": unreachable,
                    "stage_seconds": {s.name: rec["seconds"] for s in stages() if s.name != STAGE.name
                                      if (r := find_stage(run_dir, s.name))
                                      for rec in [r[1]] if "seconds" in rec}}
    return manifest, measurements


def not_byte_reproducible(lower_targets: dict) -> dict[str, str]:
    """The bundle's files that two builds of the same recipe cannot make byte-identical, as each backend's
    describe.json declares them, with the reason: none today (tests/test_end_to_end.py builds the default recipe
    twice and compares the archives)."""
    return {f"{t}/{f}": why for t, tm in lower_targets.items() if "artifact" in tm
            for f, why in (tm.get("describe") or {}).get("not_byte_reproducible", {}).items()}


def without_timings(doc):
    """A stage's metrics without the build's timings (measured, so different at every build)."""
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items() if k not in TIMING_KEYS}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


def without_build_paths(doc, base: Path):
    """A release names no folder of the build machine: absolute paths become relative to the recipe's folder
    when under it, else just their file name."""
    import os

    if isinstance(doc, dict):
        return {k: without_build_paths(v, base) for k, v in doc.items()}
    if isinstance(doc, list):
        return [without_build_paths(v, base) for v in doc]
    if isinstance(doc, str) and doc.startswith("/") and "\n" not in doc:
        rel = os.path.relpath(doc, base)
        return rel if not rel.startswith("..") else Path(doc).name
    return doc


def _device_brief(m: dict) -> dict:
    if "error" in m:
        return {"error": m["error"]}
    return {"p50_ms": m["latency"]["p50_ms"], "p90_ms": m["latency"].get("p90_ms"), "cv": m["latency"].get("cv"),
            "unstable": m["latency"].get("unstable"), "init_ms": m.get("init_ms"),
            "memory": m.get("memory"), "peak_rss_bytes": m.get("peak_rss_bytes"), "metric": m.get("metric"),
            "test_metric": m.get("test_metric"),
            "metric_drop": m.get("metric_drop"), "agreement_with_teacher": (m.get("agreement_with_teacher") or {})
            .get("worst"), "conditions": m.get("conditions"),
            "runtime": f"{m.get('runtime')} {m.get('runtime_version')}", "failures": m.get("failures")}


def _io_lines(m: dict) -> list[str]:
    iface = m.get("interface") or {"inputs": [], "outputs": []}
    lines = ["| | name | shape (batch first) | dtype |", "|---|---|---|---|"]
    for kind in ("inputs", "outputs"):
        for spec in iface[kind]:
            lines.append(f"| {kind[:-1]} | `{spec['name']}` | {[1, *spec['shape']]} | {spec['dtype']} |")
    pre = m.get("preprocessing")
    if pre:
        lines += ["", "Image preprocessing, to be done exactly so by the app: "
                  f"convert to {pre['mode']}, resize {pre['resize']}, centre crop {pre['center_crop']}, multiply by "
                  f"{pre['scale']:.6g}, subtract mean {pre['mean']}, divide by std {pre['std']}, channel order "
                  f"{pre['channel_order']}, layout {pre['layout']}."]
    return lines


def model_card(m: dict) -> str:
    st = m["stages"]
    metric = m.get("metric") or "the recipe's metric"
    lines = [f"# {m['name']} {m['version']}", "", m["recipe"].get("description", ""), "",
             "## Intended use",
             "On-device inference with the models in this bundle, one folder per runtime, batch 1. Inputs and "
             "outputs are below; int8 scale and zero point per tensor are in `manifest.json` (`io.quantized_io`).",
             "", "## Inputs and outputs", "", *_io_lines(m), "",
             "## Data",
             f"Source: `{m['recipe'].get('data')}`. Every figure is measured on the held-out test split, never used "
             f"for training or calibration, with the metric `{metric}` (against the labels, or against the float "
             f"teacher's outputs where there are none). Calibration set sha256: `{m['calibration_sha256']}`.", "",
             "## What each stage did"]
    lines += [stage.card(st[stage.name], m) for stage in stages() if stage.card and stage.name in st]
    lines += ["", "## Targets", "", f"| target | size (bytes) | test {metric} | parity cosine (worst output) |",
              "|---|---|---|---|"]
    for name, t in m["targets"].items():
        parity = (t["lower"].get("parity") or {}).get("cosine")
        lines.append(f"| {name} | {t['lower']['size_bytes']} | {fmt_metric(t['lower'].get('test_metric'))} | "
                     f"{'n/a' if parity is None else f'{parity:.6f}'} |")
    lines += ["", "## Limits",
              f"- The figures above are the build machine's runtimes on the test split. Latency, memory and accuracy "
              f"on devices are in `{m['name']}-{m['version']}.measurements.json` beside this archive; other "
              f"devices differ.",
              "- The model behaves like this on inputs like its data only; it has no notion of 'none of these'."]
    if m["failed_targets"]:
        lines += [f"- **Packaged with failing targets** (--allow-failing): {', '.join(m['failed_targets'])}."]
    if m.get("incomplete"):
        lines += [f"- **Packaged incomplete** (--allow-incomplete): {'; '.join(m['incomplete'])}."]
    return "\n".join(lines) + "\n"


def write_tar(bundle: Path, dest: Path) -> None:
    """A reproducible .tar.gz: sorted entries, zero mtimes, root owner, fixed modes, gzip without a timestamp
    (written to a temporary name, then moved into place)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = [bundle, *sorted(bundle.rglob("*"))]
        for p in paths:
            arc = (Path(bundle.name) / p.relative_to(bundle)).as_posix()
            info = tarfile.TarInfo(arc)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = p.stat().st_size, 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buf.getvalue())
    os.replace(tmp, dest)


def package(run_dir: Path, version: str, dist: Path, allow_failing: bool = False,
            recipe: dict | None = None, allow_incomplete: bool = False) -> tuple[Path, Path]:
    """Write ``dist/<name>-<version>/`` and its tar.gz, each complete or absent."""
    import tempfile

    from edge_pipeline.report import write_report

    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dist, prefix=".bundle-") as tmp:
        staging = Path(tmp) / "b"
        staging.mkdir()
        manifest, measurements = build_bundle(run_dir, version, staging, allow_failing, recipe, allow_incomplete)
        final = dist / f"{manifest['name']}-{version}"
        named = Path(tmp) / final.name
        staging.rename(named)
        tar_path = dist / f"{final.name}.tar.gz"
        write_tar(named, Path(tmp) / tar_path.name)
        release = {"archive": tar_path.name, "archive_sha256": sha256_file(Path(tmp) / tar_path.name)}
        (Path(tmp) / "measurements.json").write_text(json.dumps(release | measurements, indent=1, sort_keys=True,
                                                                default=str) + "\n")
        write_report(run_dir, Path(tmp) / "report.html", release)
        # The archive last: a folder of files that looks complete has its archive beside it.
        for src, dest in ((Path(tmp) / "measurements.json", measurements_path(tar_path)),
                          (Path(tmp) / "report.html", dist / f"{final.name}.report.html")):
            os.replace(src, dest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(named, final)
        os.replace(Path(tmp) / tar_path.name, tar_path)
    return final, tar_path


def measurements_path(tar_path: Path) -> Path:
    """``NAME-VERSION.measurements.json`` beside ``NAME-VERSION.tar.gz``."""
    return tar_path.with_name(tar_path.name.removesuffix(".tar.gz") + ".measurements.json")


def run(ctx, out: Path) -> dict:
    cfg = ctx.recipe.package
    started = time.time()
    dist = Path(cfg.dist)
    bundle, tar_path = package(ctx.store.dir, cfg.version, dist, cfg.allow_failing, ctx.recipe.model_dump())
    (out / "bundle.json").write_text(json.dumps({"bundle": str(bundle), "tar": str(tar_path)}))
    return {"bundle": str(bundle), "tar": str(tar_path), "tar_sha256": sha256_file(tar_path),
            "tar_bytes": tar_path.stat().st_size, "measurements": str(measurements_path(tar_path)),
            "report": str(tar_path.with_name(bundle.name + ".report.html")), "seconds": time.time() - started}


STAGE = Stage("package", 7, ("teacher", "prune", "distill", "cluster", "calibrate", "qat", "lower", "device-test"),
              lambda r: r.package.model_dump(), lambda r: bool(r.targets) and r.package.enabled,
              outputs=lambda m: [m["bundle"], m["tar"]], summary_keys=("tar_bytes",))

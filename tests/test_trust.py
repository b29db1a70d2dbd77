"""Trustworthy runs: recipe-relative paths, one run per folder, interruption recorded, incomplete runs not
released."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml
from edge_support import CLI, ROOT, run_cli

from edge_pipeline.errors import PipelineError
from edge_pipeline.pipeline import run
from edge_pipeline.runstore import RunStore


def test_relative_paths_in_a_recipe_resolve_against_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(project / "data" / "set.npz", x=rng.random((60, 1, 8, 8), dtype=np.float32), y=np.arange(60) % 3)
    (project / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "rel", "model": "zoo:digits-cnn", "data": "data/set.npz", "prune": {"enabled": False},
        "distill": {"enabled": False}, "calibrate": {"set": "calibration/rel", "samples": 16},
        "targets": ["ort-mobile-int8"], "output": "runs"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summary = run(project / "recipe.yaml", until="calibrate")
    assert (project / "calibration" / "rel.npz").is_file(), "the pinned set is drawn next to the recipe"
    assert summary.run_dir == project / "runs" / "rel" / "default"
    assert not list(elsewhere.iterdir()), "nothing is written in the folder the command was run from"


def test_a_second_run_on_the_same_folder_refuses_naming_the_first(tmp_path, write_recipe):
    recipe = write_recipe()
    store = RunStore(tmp_path / "runs", "tiny", "default", ["teacher"])
    with store.lock():
        res = run_cli("run", recipe, timeout=300)
    assert res.returncode == 2 and f"in use by another edge-pipeline run (PID {os.getpid()})" in res.stderr
    assert not (store.dir / "run.json").exists(), "the refused run wrote nothing"
    with store.lock():  # released: the lock can be taken again
        pass


def test_sigterm_is_recorded_as_interrupted(tmp_path, write_recipe):
    recipe = write_recipe(train={"epochs": 400})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CLI, "run", str(recipe)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "tiny" / "default"
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_dir.glob(".00-teacher.tmp-*")):
        time.sleep(0.2)
    assert list(run_dir.glob(".00-teacher.tmp-*")), "the teacher stage started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["status"] == "interrupted" and doc["failed_stage"] == "teacher"
    assert not list(run_dir.glob(".00-teacher.tmp-*")), "the unfinished stage folder is removed"


def test_package_refuses_a_run_whose_device_test_never_finished():
    from edge_pipeline.stages.package import missing_parts

    targets = {"ort-mobile-int8": {"artifact": "ort-mobile-int8/model.ort"}, "broken": {"error": "x"}}
    recipe = {"devices": ["local", "ssh://pi@board"], "device_test": {"enabled": True}}
    assert missing_parts(None, recipe, targets, None) == ["the device test never finished: no device figures"]
    assert missing_parts(None, recipe, targets, {"ort-mobile-int8": {"local": {}}}) == [
        "ort-mobile-int8 has no figures from device ssh://pi@board"]
    assert missing_parts(None, {**recipe, "device_test": {"enabled": False}}, targets, None) == []


@pytest.mark.slow
def test_package_command_refuses_an_incomplete_run_unless_allowed(tmp_path, write_recipe):
    recipe = write_recipe(targets=["ort-mobile-fp32"], device_test={"enabled": False}, package={"enabled": False},
                          devices=["local"])
    assert run(recipe).failed_targets == []
    doc = yaml.safe_load(recipe.read_text())
    doc["device_test"] = {"enabled": True}  # the run was made without its device test
    recipe.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "runs" / "tiny" / "default"
    run_json = json.loads((run_dir / "run.json").read_text())
    run_json["recipe"]["device_test"]["enabled"] = True
    (run_dir / "run.json").write_text(json.dumps(run_json))
    res = run_cli("package", run_dir, "--version", "1.0.0", "--dist", tmp_path / "dist")
    assert res.returncode == 2 and "device test never finished" in res.stderr
    assert not (tmp_path / "dist" / "tiny-1.0.0").exists()
    res = run_cli("package", run_dir, "--version", "1.0.0", "--dist", tmp_path / "dist", "--allow-incomplete")
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "dist" / "tiny-1.0.0" / "manifest.json").read_text())
    assert manifest["incomplete"] == ["the device test never finished: no device figures"]


def test_bad_input_before_a_lock_is_taken_leaves_no_run_folder(tmp_path):
    with pytest.raises(PipelineError, match="recipe file not found"):
        run(tmp_path / "nope.yaml")
    assert not (tmp_path / "runs").exists()


def test_truncated_archive_and_out_naming_a_file_are_clear_errors(tmp_path):
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("b/manifest.json")
        info.size = 5000
        tar.addfile(info, io.BytesIO(np.random.default_rng(0).bytes(5000)))  # incompressible
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(buf.getvalue())[:2000])
    res = run_cli("verify", tmp_path / "cut.tar.gz")
    assert res.returncode == 2 and "not a readable .tar.gz" in res.stderr and "Aborted" not in res.stderr
    (tmp_path / "afile").write_text("x")
    res = run_cli("run", ROOT / "recipes" / "digits.yaml", "--out", tmp_path / "afile")
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr and "--out" in res.stderr


def test_acceptance_checks_work_without_pytest():
    from edge_pipeline.device_testing import acceptance

    ok = {"size_bytes": 1000, "latency": {"p50_ms": 1.0}, "metric_drop": 0.0, "failures": []}
    results = {"results": {"ort-mobile-int8": {"local": ok, "ssh://pi@b": {**ok, "metric_drop": 0.2}},
                           "tflite-int8": {"local": {"error": "runner exited with 1"}}}}
    passed, failures = acceptance(results)
    assert passed == 1 and len(failures) == 2
    assert "accuracy drop 0.2000 > max_accuracy_drop 0.01" in failures[0] and "runner exited" in failures[1]


def test_the_acceptance_suite_without_results_is_not_green():
    suite = ROOT / "device_tests"
    res = subprocess.run([*CLI[:1], "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite), "--rootdir",
                          str(suite)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "needs --results" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_wheel_install_finds_its_targets_and_runner_from_any_folder(tmp_path):
    import shutil
    import sys

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    for part in ("edge_pipeline", "targets", "device_tests"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "whl")],
                   check=True, capture_output=True)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *(tmp_path / "whl").glob("*.whl")],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import edge_pipeline, json; from edge_pipeline.targets import BUILTIN_DIR, load_profile; "
             "from edge_pipeline.harness import RUNNER, runner; runner.runtimes(); "
             "print(json.dumps([edge_pipeline.__file__, str(BUILTIN_DIR), str(RUNNER), "
             "load_profile('tflite-int8').backend]))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    package, targets, runner, backend = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(p.startswith(str(site)) for p in (package, targets, runner)) and backend == "tflite"
    listed = subprocess.run([sys.executable, "-m", "edge_pipeline.cli", "targets"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0 and "ort-mobile-int8" in listed.stdout, listed.stderr[-2000:]


def test_the_same_model_onnx_converts_to_the_same_ort_bytes(tmp_path):
    """Three conversions of one model.onnx, in folders of different path lengths, give one .ort file byte for
    byte (in-process they gave three); a changed weight changes it, and the content digest kept as a cross-check."""
    import hashlib

    import torch
    from torch import nn

    from edge_pipeline.backends.onnxruntime import ort_content_sha256, to_ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    files, contents = [], []
    for i, scale in enumerate((1.0, 1.0, 1.0, 2.0)):
        with torch.no_grad():
            model[3].weight.mul_(scale)
        folder = tmp_path / f"{i}{'c' * 9 * i}"  # folders of other path lengths
        folder.mkdir(parents=True)
        exported = torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), dynamo=True, verbose=False)
        exported.save(str(folder / "model.onnx"))
        to_ort(folder / "model.onnx", folder, "arm")
        files.append(hashlib.sha256((folder / "model.ort").read_bytes()).hexdigest())
        contents.append(ort_content_sha256(folder / "model.ort"))
    assert files[0] == files[1] == files[2] != files[3]
    assert contents[0] == contents[1] == contents[2] != contents[3]


@pytest.mark.slow
def test_a_run_whose_device_cannot_be_reached_says_so_with_its_own_exit_code(write_recipe, tmp_path):
    spec = "ssh://nobody@127.0.0.1:1?key=/nonexistent"  # nothing listens on port 1
    recipe = write_recipe(train={"epochs": 1}, targets=["ort-mobile-fp32"], devices=[spec],
                          device_test={"runs": 3, "warmup": 1, "timeout_s": 20})
    res = run_cli("run", recipe, timeout=600)
    assert res.returncode == 4, res.stdout[-3000:] + res.stderr[-3000:]
    said = " ".join((res.stdout + res.stderr).split())
    assert "could not be reached" in said and spec in said
    doc = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    assert doc["status"] == "devices-unreachable" and doc["failed_stage"] == "package"
    assert "connect failed" in doc["unreachable_devices"][spec]
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())  # no bundle

"""A broken recipe fails before any work, naming the file, the key and what was expected."""

import pytest
import yaml
from edge_support import run_cli

from edge_pipeline.errors import PipelineError
from edge_pipeline.recipe import load_recipe


def test_default_recipe_is_valid():
    r = load_recipe("recipes/digits.yaml")
    assert r.name == "digits" and len(r.targets) == 6


@pytest.mark.parametrize("overrides, message, key", [
    ({"modle": "zoo:digits-cnn"}, "unknown key 'modle'", "modle"),
    ({"prune": {"ratoi": 0.5}}, "unknown key 'ratoi'", "prune.ratoi"),
    ({"train": {"epochs": "many"}}, "invalid value 'many'", "train.epochs"),
    ({"model": "zoo:nope"}, "no model 'nope' in the zoo", "model"),
    ({"data": "missing/data.npz"}, "data file or folder not found", "data"),
    ({"targets": ["no-such-target"]}, "unknown target profile 'no-such-target'", "targets[0]"),
    ({"devices": ["ftp://x"]}, "unknown device 'ftp://x'", "devices[0]"),
    ({"model": "no_such_pkg.models:build"}, "cannot import module 'no_such_pkg.models'", "model"),
])
def test_bad_recipe_names_file_key_and_problem(write_recipe, overrides, message, key):
    path = write_recipe(**overrides)
    with pytest.raises(PipelineError) as e:
        load_recipe(path)
    assert message in str(e.value)
    assert str(path) in e.value.where and key in e.value.where


def test_unknown_key_suggests_the_close_one(write_recipe):
    with pytest.raises(PipelineError) as e:
        load_recipe(write_recipe(prune={"max_mac": 0.5}))
    assert "max_macs" in e.value.hint


def test_missing_required_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "data": "zoo:digits"}))
    with pytest.raises(PipelineError, match="missing required key 'model'"):
        load_recipe(p)


def test_cli_broken_recipe_exits_2_without_traceback_or_run_folder(write_recipe, tmp_path):
    path = write_recipe(model="zoo:nope")
    res = run_cli("run", path)
    assert res.returncode == 2
    assert "no model 'nope' in the zoo" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_help_and_version():
    assert run_cli("--version").stdout.startswith("edge-pipeline, version")
    for cmd in ("run", "prune", "distill", "calibrate", "lower", "targets", "doctor"):
        assert run_cli(cmd, "--help").returncode == 0


def _load_error(path, text: str) -> str:
    from edge_pipeline.recipe import load_recipe

    path.write_text(text)
    with pytest.raises(PipelineError) as e:
        load_recipe(path)
    return str(e.value)


def test_every_mistake_in_a_recipe_is_reported_at_once(tmp_path):
    text = _load_error(tmp_path / "r.yaml", "name: r\nmodel: zoo:digits-cnn\ndata: zoo:digits\ntrian: {epochs: 3}\n"
                       "distill: {temperature: -1}\n")
    assert text.startswith("2 problems") and "unknown key 'trian'" in text and "did you mean train" in text
    assert "distill.temperature" in text
    text = _load_error(tmp_path / "refs.yaml", "name: r\nmodel: zoo:nope\ndata: zoo:digits\n"
                       "targets: [no-such-target, tflite-int8]\ndevices: [local, 'ftp://x']\n")
    assert text.startswith("3 problems") and "model" in text and "targets[0]" in text and "devices[1]" in text


@pytest.mark.slow
def test_init_writes_a_recipe_that_runs_for_a_model_given_as_a_callable(tmp_path):
    import realshaped as rs
    import torch
    import yaml
    from edge_support import run_cli

    torch.save(rs.train_briefly(rs.keyword_net(), "realshaped:keywords"), tmp_path / "kws.pt")
    path = tmp_path / "proj" / "kws.yaml"
    res = run_cli("init", "--model", "realshaped:keyword_net", "--weights", tmp_path / "kws.pt",
                  "--data", "realshaped:keywords", "--targets", "ort-mobile-int8", "--out", path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"edge-pipeline run {path}" in " ".join(res.stdout.split())
    text = path.read_text()
    assert "#   input  signal: [1, 400] float32" in text and "#   output output: [4] float32" in text
    doc = yaml.safe_load(text)
    assert doc["weights"] == "../kws.pt" and doc["prune"]["max_macs"] == 0.5 and doc["distill"]["student"] == "pruned"
    doc["distill"]["epochs"], doc["prune"]["finetune_epochs"] = 3, 1  # as written, only shorter
    path.write_text(yaml.safe_dump(doc))
    run = run_cli("run", path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "proj" / "calibration" / "keyword_net-256.npz").is_file()  # pinned beside the recipe
    again = run_cli("init", "--model", "realshaped:keyword_net", "--data", "realshaped:keywords", "--out", path)
    assert again.returncode == 2 and "exists" in again.stderr

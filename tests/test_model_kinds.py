"""Real-shaped model kinds through every stage to every runtime, and bad input through the CLI.

An RGB CNN from an image folder; a model with three outputs and no labels; a Conv1d keyword spotter streamed
from a torch Dataset; a transformer encoder on int64 token ids and an attention mask (dict items, as a
tokenizer gives them).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import realshaped as rs
import torch
import yaml
from edge_support import run_cli

from edge_pipeline.verify import verify

INT8 = ["executorch-xnnpack-int8", "ort-mobile-int8", "tflite-int8", "openvino-cpu-int8"]


def _recipe(tmp: Path, name: str, **doc) -> Path:
    base = {"name": name, "train": {"epochs": 4}, "calibrate": {"samples": 48}, "distill": {"epochs": 3},
            "prune": {"ratio": 0.3, "iterative_steps": 1, "finetune_epochs": 1}, "targets": INT8,
            "device_test": {"runs": 5, "warmup": 1}, "output": str(tmp / "runs"),
            "package": {"dist": str(tmp / "dist")}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**base, **doc}))
    return path


def _kind(name: str, tmp: Path) -> Path:
    if name == "rgb":
        rs.write_rgb_folder(tmp / "imgs")
        return _recipe(tmp, name, model="zoo:resnet-tiny", data=str(tmp / "imgs"),
                       preprocess={"resize": 20, "center_crop": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    if name == "three-outputs":
        return _recipe(tmp, name, model="realshaped:three_heads", data="realshaped:face_crops")
    if name == "onet":
        return _recipe(tmp, name, model="realshaped:onet", data="realshaped:face_crops48")
    if name == "conv1d":
        torch.save(rs.train_briefly(rs.keyword_net(), "realshaped:keywords"), tmp / "kws.pt")
        return _recipe(tmp, name, model="realshaped:keyword_net", data="realshaped:keywords",
                       weights=str(tmp / "kws.pt"))
    torch.save(rs.train_briefly(rs.tiny_encoder(), "realshaped:token_splits", 15), tmp / "tok.pt")
    return _recipe(tmp, name, model="realshaped:tiny_encoder", data="realshaped:token_splits",
                   weights=str(tmp / "tok.pt"))


EXPECTED_IO = {
    "rgb": (["x"], ["output"], "top1"),
    "three-outputs": (["image"], ["boxes", "landmarks", "prob"], "cosine"),
    "onet": (["x"], ["0", "1", "2"], "cosine"),  # MTCNN's ONet: PReLU after a Linear, a tuple of three
    "conv1d": (["signal"], ["output"], "top1"),
    "tokens": (["input_ids", "attention_mask"], ["output"], "top1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(EXPECTED_IO))
def test_model_kind_runs_every_stage_on_all_three_runtimes(kind, tmp_path):
    res = run_cli("run", _kind(kind, tmp_path), "--json", timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(res.stdout)
    inputs, outputs, metric = EXPECTED_IO[kind]
    assert doc["status"] == "ok" and doc["failed_targets"] == []
    assert [s["name"] for s in doc["interface"]["inputs"]] == inputs
    assert [s["name"] for s in doc["interface"]["outputs"]] == outputs and doc["metric"] == metric
    lower = doc["stages"]["lower"]["metrics"]
    for name in INT8:
        t = lower["targets"][name]
        assert t["parity_ok"] and not t["failures"], (name, t.get("failures"), t.get("error"))
        assert set(t["parity"]["outputs"]) == set(outputs), "parity is judged on every output"
        assert [d["name"] for d in t["describe"]["outputs"]] == outputs
    devices = doc["stages"]["device-test"]["metrics"]["results"]
    assert all(by["local"]["metric"] == metric and "p50_ms" in by["local"]["latency"] for by in devices.values())
    bundle = Path(doc["stages"]["package"]["metrics"]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [s["name"] for s in manifest["interface"]["outputs"]] == outputs
    card = (bundle / "MODEL_CARD.md").read_text()
    assert all(f"`{n}`" in card for n in inputs + outputs)
    if kind == "rgb":
        assert manifest["preprocessing"]["mode"] == "RGB" and manifest["preprocessing"]["center_crop"] == 16
        assert "Image preprocessing" in card and (bundle / "labels.txt").read_text().split() == list(
            sorted(rs.COLOURS))
    assert verify(bundle)["targets"].keys() == set(INT8)


BAD_MODULE = '''
import numpy as np, torch

class Odd(torch.nn.Module):
    def forward(self, x):
        return {"y": x.flatten(1), "note": "not a tensor"}

def odd():
    return Odd()

def net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))

def nan_data():
    x = np.zeros((40, 8), np.float32)
    x[17, 2] = np.nan
    return x, np.arange(40) % 3

def one_class():
    return np.zeros((40, 8), np.float32), np.zeros(40, int)

def five():
    return np.zeros((5, 8), np.float32), np.arange(5) % 2

def unlabelled():
    return np.zeros((40, 8), np.float32), None

def mismatch():
    return np.zeros((40, 8), np.float32), np.arange(39) % 3
'''


@pytest.mark.parametrize("case, overrides, message", [
    ("output", {"model": "badmod:odd", "data": "badmod:unlabelled"}, "model output 'note' is a str"),
    ("nan", {"data": "badmod:nan_data"}, "NaN or Inf at row 17"),
    ("one-class", {"data": "badmod:one_class"}, "every label is 0"),
    ("five", {"data": "badmod:five"}, "only 5 samples"),
    ("lengths", {"data": "badmod:mismatch"}, "different lengths"),
    ("metric", {"data": "badmod:unlabelled", "metric": "top1"}, "metric top1 needs labels"),
    ("weights", {"weights": "WEIGHTS"}, "weights file cannot be read"),
    ("prune", {"prune": {"ratio": 0.5, "max_macs": 0.5}}, "either prune.ratio or a budget"),
])
def test_bad_input_stops_before_any_work_with_exit_2(case, overrides, message, tmp_path):
    (tmp_path / "badmod.py").write_text(BAD_MODULE)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 truncated")
    doc = {"name": "bad", "model": "badmod:net", "data": "badmod:unlabelled", "targets": ["ort-mobile-int8"],
           "prune": {"enabled": False}, "distill": {"enabled": False}, "output": str(tmp_path / "runs")}
    doc.update({k: (str(tmp_path / "truncated.pt") if v == "WEIGHTS" else v) for k, v in overrides.items()})
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    res = run_cli("run", recipe, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    run_json = tmp_path / "runs" / "bad" / "default" / "run.json"
    status = json.loads(run_json.read_text())
    assert status["status"] == "failed" and message in status["error"]
    assert not [p for p in run_json.parent.iterdir() if p.name[:2].isdigit()], "no stage folder was written"


def test_a_crash_inside_a_stage_is_recorded_in_run_json(tmp_path):
    """Not a PipelineError: run.json says failed, with the stage and the message, never 'running'."""
    (tmp_path / "crashmod.py").write_text(
        "import numpy as np, torch\n"
        "def net():\n    return torch.nn.Linear(8, 3)\n"
        "def data():\n    return np.random.default_rng(0).random((40, 8), dtype=np.float32), np.arange(40) % 3\n")
    # The pinned set's folder cannot be made (a file stands where it should be): an OSError inside calibrate.
    (tmp_path / "not-a-dir").write_text("a file where a folder should be")
    doc = {"name": "crash", "model": "crashmod:net", "data": "crashmod:data", "targets": ["ort-mobile-int8"],
           "prune": {"enabled": False}, "distill": {"enabled": False},
           "calibrate": {"set": str(tmp_path / "not-a-dir" / "x" / "set")}, "output": str(tmp_path / "runs")}
    recipe = tmp_path / "crash.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    res = run_cli("run", recipe, cwd=tmp_path, timeout=300)
    assert res.returncode == 3 and "internal error" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr[-2000:]
    status = json.loads((tmp_path / "runs" / "crash" / "default" / "run.json").read_text())
    assert status["status"] == "failed" and status["failed_stage"] == "calibrate" and status["error"]


def test_dict_items_keep_their_names_and_order():
    from edge_pipeline.sources import load_data

    data = load_data("realshaped:token_splits")
    assert data.input_names == ["input_ids", "attention_mask"]
    ids, mask = data.test.rows(np.arange(3))
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ((ids == 0) | (mask == 1)).all()

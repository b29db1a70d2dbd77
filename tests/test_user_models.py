"""What a user's own model and data meet first: dict items bound to forward by name, a model's read-only
properties, a raising model callable, and failures shown with their figures (terminal, report.html)."""

import json

import numpy as np
import pytest
import torch
import yaml
from edge_support import run_cli
from torch import nn

KEYED_MODULE = '''
import numpy as np, torch
from torch import nn

class KeyOrder(nn.Module):
    """forward's order is not a tokenizer's: a positional feed in key order gives other (wrong) scores."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(32, 16)
        self.seg = nn.Embedding(2, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.tok(input_ids) + self.seg(token_type_ids)
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))

def model():
    return KeyOrder().eval()

class Items(torch.utils.data.Dataset):
    def __init__(self, extra=False):
        rng = np.random.default_rng(0)
        self.ids = rng.integers(2, 32, (120, 8))
        self.extra = extra

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "token_type_ids": (np.arange(8) >= 4).astype(np.int64),
                "attention_mask": (np.arange(8) < 3 + i % 5).astype(np.int64), "label": int(self.ids[i, 0] > 16)}
        return {**item, "pixel_values": np.zeros(2, np.float32)} if self.extra else item

def items():
    return Items()

def items_with_extra_key():
    return Items(extra=True)

def raising_model():
    raise RuntimeError("the checkpoint's head has 5 classes, the config says 10")
'''


def _write(tmp_path, **doc) -> str:
    (tmp_path / "keyed.py").write_text(KEYED_MODULE)
    base = {"name": "keyed", "model": "keyed:model", "data": "keyed:items", "prune": {"enabled": False},
            "distill": {"enabled": False}, "targets": [], "output": str(tmp_path / "runs")}
    path = tmp_path / "keyed.yaml"
    path.write_text(yaml.safe_dump({**base, **doc}))
    return path


def test_dict_items_go_to_forward_by_name_whatever_the_key_order(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run_cli("run", _write(tmp_path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "runs" / "keyed" / "default" / "run.json").read_text())
    assert [i["name"] for i in doc["interface"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]

    import keyed

    from edge_pipeline.sources import load_data

    data = load_data("keyed:items")  # as the source gives it: the tokenizer's key order
    assert data.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    rows = data.test.rows(np.arange(len(data.test)))
    model = keyed.model()
    with torch.no_grad():
        by_name = model(**{k: torch.from_numpy(a) for k, a in zip(data.input_names, rows, strict=True)})
        by_key_order = model(*map(torch.from_numpy, rows))
    keyword_top1 = float((by_name.argmax(1).numpy() == data.test.y).mean())
    assert not torch.allclose(by_name, by_key_order), "the test model must tell the two orders apart"
    assert doc["stages"]["teacher"]["metrics"]["test_metric"] == pytest.approx(keyword_top1)


def test_a_data_key_forward_does_not_take_is_refused_naming_it(tmp_path):
    res = run_cli("run", _write(tmp_path, data="keyed:items_with_extra_key"), cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "'pixel_values' is not a parameter" in res.stderr and "forward(input_ids" in res.stderr


def test_a_raising_model_callable_is_bad_input_naming_it_with_or_without_debug(tmp_path):
    recipe = _write(tmp_path, model="keyed:raising_model")
    for args in (("run", recipe), ("--debug", "run", recipe)):
        res = run_cli(*args, cwd=tmp_path, timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "'keyed:raising_model' raised RuntimeError: the checkpoint's head has 5 classes" in res.stderr
    assert "Traceback" in res.stderr, "--debug shows the traceback, and keeps the exit code"


def test_read_only_properties_are_never_set_when_a_saved_model_is_loaded(tmp_path):
    """timm's ConvNormAct exposes in_channels as a property without a setter; a pruned model saved and loaded
    again restores the conv's own attribute and leaves the property to follow it."""
    from edge_pipeline.modelio import load_model, save_model

    class ConvNormAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)

        @property
        def in_channels(self):
            return self.conv.in_channels

        def forward(self, x):
            return self.bn(self.conv(x))

    (tmp_path / "cna.py").write_text("")
    model = ConvNormAct()
    model.conv.out_channels = 4  # as pruning leaves it: tensors and attributes shrunk together
    model.conv.weight = nn.Parameter(model.conv.weight[:4].detach().clone())
    model.conv.bias = nn.Parameter(model.conv.bias[:4].detach().clone())
    model.bn = nn.BatchNorm2d(4)
    import sys
    import types

    mod = types.ModuleType("cna_models")
    mod.make = ConvNormAct
    sys.modules["cna_models"] = mod
    try:
        save_model(model, {"source": "cna_models:make", "num_classes": None, "in_channels": 3}, tmp_path / "m.pt")
        loaded, _ = load_model(tmp_path / "m.pt")
    finally:
        del sys.modules["cna_models"]
    assert loaded.conv.out_channels == 4 and loaded.in_channels == 3
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_exit_1_lists_each_failed_check_with_its_figure_and_a_report_is_written(tmp_path):
    profile = tmp_path / "tiny-ort.yaml"
    profile.write_text(yaml.safe_dump({"name": "tiny-ort", "backend": "onnxruntime", "precision": "fp32",
                                       "budgets": {"max_size_bytes": 1000}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "model": "zoo:digits-cnn", "data": "zoo:digits",
                                      "train": {"epochs": 1}, "prune": {"enabled": False},
                                      "distill": {"enabled": False}, "targets": [str(profile)],
                                      "device_test": {"runs": 3, "warmup": 1},
                                      "output": str(tmp_path / "runs")}))
    res = run_cli("run", recipe, cwd=tmp_path, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    said = " ".join(res.stderr.split())
    # package refuses the failing target; the table and each miss still come before its error
    assert "targets × devices" in said and "stage package failed" in said, said[-2000:]
    assert said.index("targets that failed: tiny-ort") < said.index("stage package failed")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir()), "no bundle of a failed run"
    assert "tiny-ort lower: size" in said and "> max_size_bytes 1000" in said, said[-2000:]
    run_dir = tmp_path / "runs" / "tiny" / "default"
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["failed_targets"] == ["tiny-ort"] and doc["metric"] == "top1"
    page = (run_dir / "report.html").read_text()
    assert "max_size_bytes 1000" in page and "{'" not in page, "reasons are sentences, not dicts"

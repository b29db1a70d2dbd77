"""The benchmark runs all three variants per backend and writes its table and JSON."""

import json

import pytest

from edge_pipeline import bench


@pytest.mark.slow
def test_bench_measures_three_variants_per_backend(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RUNS", 5)
    monkeypatch.setattr(bench, "WARMUP", 1)
    recipe = write_recipe(prune={"ratio": 0.5, "iterative_steps": 1, "finetune_epochs": 1},
                          distill={"epochs": 2}, calibrate={"samples": 32, "compare_methods": False},
                          targets=["ort-mobile-int8"])
    doc = bench.bench([str(recipe)], tmp_path / "BENCH.md", out_root=tmp_path / "runs")
    r = doc["recipes"][0]
    assert set(r["backends"]) == {"executorch", "onnxruntime", "tflite"}
    for by in r["backends"].values():
        assert set(by) == {"fp32_teacher", "default_int8_teacher", "pipeline_int8"}
        assert by["pipeline_int8"]["params"] < by["fp32_teacher"]["params"]
        assert by["pipeline_int8"]["ratio_to_fp32"]["size"] < 0.5
        assert by["fp32_teacher"]["threads_1"]["p50_ms"] > 0
    md = (tmp_path / "BENCH.md").read_text()
    assert "| executorch | pipeline_int8 |" in md and "cores" in md
    assert json.loads((tmp_path / "BENCH.json").read_text())["machine"]["cores"] >= 1

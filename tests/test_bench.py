"""The benchmark runs all four variants per backend, checks the issue's targets and writes its table and JSON."""

import json

import pytest

from edge_pipeline import bench


def _row(size, params, p50, acc, **extra):
    return {"size_bytes": size, "params": params, "test_metric": acc, "threads_1": {"p50_ms": p50}, **extra}


def _backend(ours_size, ours_p50, ours_acc, default_acc=0.99):
    by = {"fp32_teacher": _row(4000, 1000, 1.0, 0.995), "default_int8_teacher": _row(1100, 1000, 0.5, default_acc),
          "pipeline_int8": _row(ours_size, 300, ours_p50, ours_acc),
          "format_floor": _row(150, 50, 0.1, 0.5, format_overhead_bytes=100)}
    by["pipeline_int8"]["ratio_to_fp32"] = {"size": ours_size / 4000, "p50_1_thread": ours_p50 / 1.0}
    return by


def test_targets_met_and_missed_with_their_values():
    met = bench.check_targets(_backend(ours_size=400, ours_p50=0.2, ours_acc=0.99))
    assert [t["met"] for t in met] == [True, True, True, True, True]
    assert met[1]["floor"] == pytest.approx(0.1)  # the runtime's per-call floor against the teacher
    assert met[4]["value"] == pytest.approx(400 / (300 + 100))

    missed = bench.check_targets(_backend(ours_size=480, ours_p50=0.3, ours_acc=0.98))
    assert [t["met"] for t in missed] == [False, False, False, False, False]
    assert missed[0]["value"] == pytest.approx(0.12)


def test_accuracy_below_the_default_flow_is_a_miss_even_within_one_point():
    t = bench.check_targets(_backend(ours_size=400, ours_p50=0.2, ours_acc=0.99, default_acc=0.992))
    assert t[2]["met"] and not t[3]["met"]


def test_post_training_targets_hold_agreement_ceiling_bytes_and_wall_time():
    by = _backend(ours_size=1050, ours_p50=0.45, ours_acc=0.85)
    by["pipeline_int8"].update(params=1000, bytes_per_param=1.05, agreement={"top1_agreement": 0.96})
    met = bench.check_targets(by, ptq_only=True, ceiling=0.86, pipeline_seconds=250)
    assert [t["met"] for t in met] == [True, True, False, True, True, True]  # 0.85 < the default flow's 0.99
    by["default_int8_teacher"]["test_metric"] = 0.80
    assert all(t["met"] for t in bench.check_targets(by, ptq_only=True, ceiling=0.86, pipeline_seconds=250))
    by["pipeline_int8"].update(bytes_per_param=1.14, agreement={"top1_agreement": 0.94})
    by["pipeline_int8"]["ratio_to_fp32"]["p50_1_thread"] = 0.73
    missed = bench.check_targets(by, ptq_only=True, ceiling=0.88, pipeline_seconds=301)
    assert [t["met"] for t in missed] == [False, False, True, False, False, False]
    # A model without a class output has no top-1 agreement: the target cannot be met, and says n/a.
    by["pipeline_int8"]["agreement"] = {"top1_agreement": None}
    assert not bench.check_targets(by, ptq_only=True, ceiling=0.86)[0]["met"]


def test_timed_runs_shrink_for_big_models():
    assert bench.timed_runs(7_000_000) == bench.RUNS
    assert bench.MIN_RUNS <= bench.timed_runs(400_000_000) < bench.RUNS


def test_ort_platform_and_the_note_for_a_file_built_for_another_one():
    from edge_pipeline.targets import load_profile, ort_platform, platform_notes

    assert [ort_platform(m) for m in ("x86_64", "AMD64", "aarch64", "arm64", "armv7l")] == \
        ["amd64", "amd64", "arm", "arm", "arm"]
    ort_arm = load_profile("ort-mobile-int8")
    assert platform_notes(ort_arm, "aarch64") == []
    assert "optimized for arm, measured on x86_64" in platform_notes(ort_arm, "x86_64")[0]
    assert platform_notes(load_profile("tflite-int8"), "x86_64") == []
    assert load_profile("ort-x86-int8").platform == "amd64" and platform_notes(load_profile("ort-x86-int8"),
                                                                                "x86_64") == []
    vnni = load_profile("ort-x86-vnni-int8")
    assert vnni.platform == "amd64-vnni" and platform_notes(vnni, "x86_64") == [], "x86 layouts, VNNI or not"


def test_bench_builds_ort_files_for_the_machine_that_times_them():
    from edge_pipeline.targets import load_profile, ort_files_for

    with ort_files_for("amd64"):
        assert load_profile("ort-mobile-int8").platform == "amd64"
        assert load_profile("tflite-int8").platform == "arm"  # only ORT bakes a platform in
    assert load_profile("ort-mobile-int8").platform == "arm"


@pytest.mark.slow
def test_bench_measures_four_variants_per_backend(write_recipe, tmp_path, monkeypatch):
    from edge_pipeline.backends import backends

    monkeypatch.setattr(bench, "RUNS", 5)
    monkeypatch.setattr(bench, "WARMUP", 1)
    monkeypatch.setattr(bench, "ROUNDS", 1)
    recipe = write_recipe(prune={"ratio": 0.5, "iterative_steps": 1, "finetune_epochs": 1},
                          distill={"epochs": 2}, calibrate={"samples": 32},
                          targets=["ort-mobile-int8"])
    doc = bench.bench([str(recipe)], tmp_path / "BENCH.md", out_root=tmp_path / "runs")
    r = doc["recipes"][0]
    assert set(r["backends"]) == set(backends()), "every registered backend has its rows"
    for by in r["backends"].values():
        assert set(by) == set(bench.VARIANTS)
        assert by["pipeline_int8"]["params"] < by["fp32_teacher"]["params"]
        assert by["pipeline_int8"]["ratio_to_fp32"]["size"] < 0.5
        assert by["fp32_teacher"]["threads_1"]["p50_ms"] > 0
        assert 0 < by["format_floor"]["format_overhead_bytes"] < by["pipeline_int8"]["size_bytes"]
        assert len(by["pipeline_int8"]["targets"]) == 5
    # The calibration-method study lives here, not in the production stage: every method per backend.
    methods = r["calibration_methods"]
    assert set(methods["onnxruntime"]) == {"minmax", "moving_average", "percentile", "entropy"}
    assert set(methods["executorch"]) == set(methods["tflite"]) == {"minmax", "moving_average", "histogram"}
    assert set(methods["openvino"]) == {"minmax"}
    assert all(0 < v["cosine"] <= 1.0001 and v["size_bytes"] > 0 for by in methods.values() for v in by.values())
    md = (tmp_path / "BENCH.md").read_text()
    assert "| executorch | pipeline_int8 |" in md and "cores" in md and "| onnxruntime | size (3)/(1)" in md
    assert "int8 dot-product instructions: " in md
    assert "| onnxruntime | entropy |" in md
    assert json.loads((tmp_path / "BENCH.json").read_text())["machine"]["cores"] >= 1

"""Devices: spec parsing, the adb output parsers, and local device failure modes."""

from pathlib import Path

import numpy as np
import pytest
from edge_support import evaluator_for

from edge_pipeline.backends.executorch import parse_executor_runner
from edge_pipeline.backends.onnxruntime import parse_onnxruntime_perf_test
from edge_pipeline.backends.tflite import parse_benchmark_model
from edge_pipeline.devices import parse_device
from edge_pipeline.errors import PipelineError
from edge_pipeline.sources import build_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_device_specs():
    assert parse_device("local").kind == "local"
    d = parse_device("ssh://pi@127.0.0.1:2222?key=/tmp/k&python=/usr/bin/python3")
    assert (d.user, d.host, d.port, d.options["key"], d.options["python"]) == ("pi", "127.0.0.1", 2222, "/tmp/k",
                                                                              "/usr/bin/python3")
    assert parse_device("adb://emulator-5554").serial == "emulator-5554"
    for bad in ("ssh://host", "ssh://u@h;rm -rf /", "usb://x"):
        with pytest.raises(PipelineError):
            parse_device(bad)


def test_parse_benchmark_model():
    m = parse_benchmark_model((FIXTURES / "benchmark_model.txt").read_text())
    assert m["init_ms"] == pytest.approx(12.75) and m["first_inference_ms"] == pytest.approx(14.744)
    assert m["latency"]["mean_ms"] == pytest.approx(13.5202) and m["latency"]["runs"] == 74
    assert m["latency"]["std_ms"] == pytest.approx(0.47)
    assert m["memory"]["model_bytes"] == int(18.7227 * 2 ** 20)
    assert "p50_ms" not in m["latency"], "benchmark_model prints no percentiles: rounds give the p50"


def test_parse_onnxruntime_perf_test():
    m = parse_onnxruntime_perf_test((FIXTURES / "onnxruntime_perf_test.txt").read_text())
    assert m["init_ms"] == pytest.approx(60.94) and m["latency"]["mean_ms"] == pytest.approx(84.3236)
    assert m["latency"]["p50_ms"] == pytest.approx(83.9571) and m["latency"]["p99_ms"] == pytest.approx(87.2244)
    assert m["latency"]["runs"] == 10 and m["memory"]["model_bytes"] == 158171136
    assert m["latency"]["p50_basis"] == "P50 the tool printed"


def test_parse_executor_runner():
    text = (FIXTURES / "executor_runner.txt").read_text()
    m = parse_executor_runner(text)
    assert m["latency"]["runs"] == 5 and m["latency"]["p50_ms"] == pytest.approx(1.01)
    assert m["latency"]["mean_ms"] == pytest.approx(5.24 / 5) and m["init_ms"] == pytest.approx(0.569)
    assert m["memory"]["planned_bytes"] == 2048 and m["bundled_io"] == {
        "ok": True, "max_absolute_error": 0.00048, "mean_absolute_error": 0.00012, "max_relative_error": 0.00009}
    # An older build prints the total only: the mean stands, and nothing claims a p50.
    old = "\n".join(ln for ln in text.splitlines() if "Iteration" not in ln)
    assert parse_executor_runner(old)["latency"] == {"mean_ms": pytest.approx(1.048), "runs": 5}


def test_p50_of_a_tool_that_prints_only_means_is_the_median_of_invocations():
    from edge_pipeline.devices.adb import median_of_rounds

    rounds = [{"latency": {"mean_ms": v, "runs": 10}} for v in (3.0, 1.0, 2.0, 9.0, 2.5)]
    lat = median_of_rounds(rounds)["latency"]
    assert lat["p50_ms"] == 2.5 and lat["runs"] == 50 and lat["p50_basis"].startswith("median of 5 invocations")


@pytest.mark.parametrize("parser", [parse_benchmark_model, parse_onnxruntime_perf_test, parse_executor_runner])
def test_parsers_refuse_unrelated_output(parser):
    with pytest.raises(ValueError):
        parser("Segmentation fault\n")


def _model():
    import torch

    torch.manual_seed(0)
    return build_model("zoo:digits-cnn", 10, 1, width=0.25).eval()


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, digits):
    """One small ORT and one TFLite artifact, lowered for real."""
    from edge_pipeline.stages.lower import lower_all
    from edge_pipeline.targets import load_profile

    out = tmp_path_factory.mktemp("lowered")
    model = _model()
    profiles = [load_profile("ort-mobile-fp32"), load_profile("tflite-fp32")]
    return out, lower_all(model, profiles, evaluator_for(model, digits), digits.train.x[:8], out), profiles


def _test(lowered, digits, devices, timeout=120, profile=False):
    from edge_pipeline.sources.data import ArraySplit, Splits
    from edge_pipeline.stages.device_test import measure_targets

    out, metrics, profiles = lowered
    few = Splits(digits.train, digits.val, ArraySplit((digits.test.x[:20],), digits.test.y[:20]), digits.classes,
                 digits.source)
    return measure_targets(out, metrics, profiles, devices, evaluator_for(_model(), few), threads=1, runs=5, warmup=1,
                        timeout=timeout, profile=profile)


def test_local_device_measures_every_target(lowered, digits, monkeypatch):
    from edge_pipeline.devices import LocalDevice

    pushed = []
    real_push = LocalDevice.push
    monkeypatch.setattr(LocalDevice, "push", lambda self, files: (pushed.extend(f.name for f in files),
                                                                  real_push(self, files)))
    res = _test(lowered, digits, ["local"])
    assert pushed.count("runner.py") == 1 and pushed.count("eval_inputs.npz") == 1, "once per device, not per target"
    for target in ("ort-mobile-fp32", "tflite-fp32"):
        m = res["results"][target]["local"]
        assert "error" not in m, m
        assert m["latency"]["runs"] == 5 and m["size_bytes"] > 0
        # The device's outputs are scored on the host: the fp32 artifacts of this model agree with it.
        assert m["metric"] == "top1" and m["agreement_with_teacher"]["worst"]["cosine"] > 0.999
        assert m["conditions"]["threads"] == 1


def test_corrupt_artifact_fails_alone_and_unreachable_host_is_an_error(lowered, digits, tmp_path):
    out, metrics, profiles = lowered
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / metrics["targets"]["tflite-fp32"]["artifact"]).write_bytes(b"not a flatbuffer")
    res = _test((broken, metrics, profiles), digits, ["local"])
    broken_result = res["results"]["tflite-fp32"]["local"]
    assert "error" in broken_result and "model.tflite" in broken_result["error"]
    assert "error" not in res["results"]["ort-mobile-fp32"]["local"], "the other target is still measured"
    # Nothing listens on port 1: the device fails at connect, with the device named, and nothing hangs.
    spec = "ssh://nobody@127.0.0.1:1?key=/nonexistent"
    res = _test(lowered, digits, [spec], timeout=20)
    for r in res["results"].values():
        assert "connect failed" in r[spec]["error"] and spec in r[spec]["error"] and r[spec]["unreachable"]
    # Reported as unreachable, not as targets that missed their budgets.
    assert res["failed_targets"] == [] and "connect failed" in res["unreachable_devices"][spec]


def test_runner_pins_a_one_thread_run_to_one_core(lowered, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from edge_pipeline.harness import RUNNER

    out, metrics, _ = lowered
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.zeros((2, 1, 8, 8), np.float32))
    artifact = out / metrics["targets"]["ort-mobile-fp32"]["artifact"]
    for flags, cores in ((["--pin"], 1), ([], len(os.sched_getaffinity(0)))):
        subprocess.run([sys.executable, str(RUNNER), str(artifact), str(inputs), str(tmp_path / "r.json"),
                        "--runs", "3", "--warmup", "0", *flags], check=True, capture_output=True)
        assert len(json.loads((tmp_path / "r.json").read_text())["conditions"]["cpu_affinity"]) == cores


def test_memory_is_the_models_own_not_the_harness(digits, tmp_path):
    """ExecuTorch's Python API imports torch: the runner process peaks at hundreds of MB whatever the model.
    The figure reported is the model's: resident set after load and runs, less before load."""
    from edge_pipeline.stages.lower import lower_all
    from edge_pipeline.targets import load_profile

    model = _model()
    profiles = [load_profile("executorch-xnnpack-int8")]
    metrics = lower_all(model, profiles, evaluator_for(model, digits), digits.train.x[:64], tmp_path)
    m = _test((tmp_path, metrics, profiles), digits, ["local"])["results"]["executorch-xnnpack-int8"]["local"]
    assert m["peak_rss_bytes"] > 100 * 2**20, "the harness: torch imported"
    assert 0 < m["memory"]["model_bytes"] < 16 * 2**20, m["memory"]
    assert m["memory"]["source"].startswith("runner: resident set after load")


STANDIN = Path(__file__).parent / "adb_standin"


@pytest.fixture
def adb_phone(tmp_path, monkeypatch):
    """An adb device spec served by the test double in tests/adb_standin (the "phone" is a folder here), with
    the three runtimes' benchmark tools given by their paths on this machine, as a user gives real ones."""
    import os
    import sys

    monkeypatch.setenv("ADB_STANDIN_ROOT", str(tmp_path / "phone"))
    monkeypatch.setenv("ADB_STANDIN_SERIAL", "standin-1")
    monkeypatch.setenv("PATH", os.pathsep.join([str(STANDIN), str(Path(sys.executable).parent), os.environ["PATH"]]))
    tools = "&".join(f"{t}={STANDIN / t}" for t in ("executor_runner", "onnxruntime_perf_test", "benchmark_model"))
    return f"adb://standin-1?{tools}", tmp_path / "phone"


@pytest.fixture(scope="module")
def lowered_int8(tmp_path_factory, digits):
    from edge_pipeline.stages.lower import lower_all
    from edge_pipeline.targets import load_profile

    out = tmp_path_factory.mktemp("lowered-int8")
    profiles = [load_profile(p) for p in ("executorch-xnnpack-int8", "ort-mobile-int8", "tflite-int8")]
    model = _model()
    return out, lower_all(model, profiles, evaluator_for(model, digits), digits.train.x[:64], out), profiles


def test_adb_runs_each_runtimes_own_tool_and_reports_p50(lowered_int8, digits, adb_phone):
    spec, phone = adb_phone
    res = _test(lowered_int8, digits, [spec, "local"], profile=True)  # two devices, measured in parallel
    assert res["unreachable_devices"] == {}
    assert all(res["results"][t]["local"]["agreement_with_teacher"]["worst"]["cosine"] > 0.9
               for t in res["results"]), "local: the whole evaluation split, scored here"
    by = {t: res["results"][t][spec] for t in ("executorch-xnnpack-int8", "ort-mobile-int8", "tflite-int8")}
    for target, m in by.items():
        assert "error" not in m, (target, m)
        lat = m["latency"]
        assert lat["p50_ms"] > 0 and lat["mean_ms"] > 0 and m["init_ms"] > 0 and lat["p50_basis"], (target, lat)
        assert "golden input only" in m["accuracy"] and m["conditions"]["threads"] == 1
        assert "source" in m["memory"]
    et = by["executorch-xnnpack-int8"]
    assert et["runtime"] == "executor_runner" and et["latency"]["runs"] == 5, et["latency"]
    assert et["bundled_io"]["ok"] and et["golden_parity"]["cosine"] > 0.9999, et
    assert by["ort-mobile-int8"]["latency"]["p50_basis"] == "P50 the tool printed"
    assert by["ort-mobile-int8"]["memory"]["model_bytes"] > 0
    assert by["tflite-int8"]["latency"]["p50_basis"].startswith("median of 5 invocations")
    assert by["tflite-int8"]["memory"]["model_bytes"] is not None
    # An arm-optimized ORT file measured on this (x86) stand-in says its latency is not the target's.
    assert by["ort-mobile-int8"]["notes"] or not by["ort-mobile-int8"]["conditions"]["arch"].startswith("x86")
    assert not any(phone.rglob("*.pte")) and not any(phone.rglob("*.bpte")), "the phone is cleaned up"
    # Per-operator profiles: LiteRT's from benchmark_model's table on the phone, ExecuTorch's and ORT's from their
    # own profilers on this host; where a tool prints none, the result says so instead of inventing one.
    tfl = by["tflite-int8"]["profile"]
    assert tfl["source"] == "benchmark_model --enable_op_profiling=true" and tfl["summary"]["ops"] > 0, tfl
    assert by["executorch-xnnpack-int8"]["profile"]["unavailable"].startswith("no per-operator profile from")
    for target in ("executorch-xnnpack-int8", "ort-mobile-int8"):
        assert res["results"][target]["local"]["profile"]["summary"]["total_ms"] > 0
    assert "unavailable" in res["results"]["tflite-int8"]["local"]["profile"]


def test_adb_reports_a_failed_bundled_check_and_a_missing_tool(lowered_int8, digits, adb_phone, tmp_path):
    """A program whose recorded outputs do not match what the phone computes fails its target; a tool not
    given in the spec fails that target only, saying which key to add."""
    import shutil

    import torch
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    out, metrics, profiles = lowered_int8
    copy = tmp_path / "lowered"
    shutil.copytree(out, copy)
    pte = copy / "executorch-xnnpack-int8" / "model.pte"
    wrong = MethodTestCase(inputs=[torch.from_numpy(digits.test.x[:1])], expected_outputs=[torch.full((1, 10), 9.0)])
    (pte.parent / "model.bpte").write_bytes(serialize_from_bundled_program_to_flatbuffer(
        BundledProgram(None, [MethodTestSuite(method_name="forward", test_cases=[wrong])], pte_file_path=str(pte))))
    spec, _ = adb_phone
    spec = spec.split("&benchmark_model=")[0]
    res = _test((copy, metrics, profiles), digits, [spec])
    et = res["results"]["executorch-xnnpack-int8"][spec]
    assert any("bundled-IO check failed" in f for f in et["failures"]), et
    tfl = res["results"]["tflite-int8"][spec]
    assert "no benchmark_model binary given" in tfl["error"] and "?benchmark_model=PATH" in tfl["error"]
    assert "executorch-xnnpack-int8" in res["failed_targets"] and "ort-mobile-int8" not in res["failed_targets"]


def test_parse_benchmark_model_op_profile():
    """LiteRT's per-operator table (--enable_op_profiling=true), in the format of the real tool's output: the
    benchmark run's table, not the initialization's; set-up rows (times called 0) left out."""
    from edge_pipeline.backends.tflite import parse_op_profile
    from edge_pipeline.profiles import summarize

    ops = parse_op_profile((FIXTURES / "benchmark_model_op_profiling.txt").read_text())
    assert [o["kind"] for o in ops][:3] == ["Convert (NC)", "Convolution (NHWC, QC8) IGEMM", "Constant Pad (ND, X8)"]
    assert len(ops) == 7 and ops[1]["ms"] == pytest.approx(0.598)
    assert [o["overhead"] for o in ops] == ["convert", None, "pad", None, None, None, "convert"]
    s = summarize(ops)
    assert s["top_kinds"][0]["kind"] == "Convolution (NHWC, QC8) IGEMM"
    assert s["overhead_share"] == pytest.approx((0.030 + 0.040 + 0.018) / sum(o["ms"] for o in ops))
    with pytest.raises(ValueError, match="no 'Run Order' table"):
        parse_op_profile("INFO: Inference timings in us: Init: 1, First inference: 2")

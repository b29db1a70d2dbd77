"""Devices: spec parsing, the adb output parsers, and local device failure modes."""

from pathlib import Path

import numpy as np
import pytest
from edge_support import evaluator_for

from edge_pipeline.devices import parse_device
from edge_pipeline.devices.adb import parse_benchmark_model, parse_executor_runner, parse_onnxruntime_perf_test
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
    assert m["peak_memory_bytes"] == int(18.7227 * 2 ** 20)


def test_parse_onnxruntime_perf_test():
    m = parse_onnxruntime_perf_test((FIXTURES / "onnxruntime_perf_test.txt").read_text())
    assert m["init_ms"] == pytest.approx(60.94) and m["latency"]["mean_ms"] == pytest.approx(84.3236)
    assert m["latency"]["p50_ms"] == pytest.approx(83.9571) and m["latency"]["p99_ms"] == pytest.approx(87.2244)
    assert m["latency"]["runs"] == 10 and m["peak_memory_bytes"] == 158171136


def test_parse_executor_runner():
    m = parse_executor_runner((FIXTURES / "executor_runner.txt").read_text())
    assert m["latency"]["runs"] == 50 and m["latency"]["mean_ms"] == pytest.approx(51.612 / 50)


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


def _test(lowered, digits, devices, timeout=120):
    from edge_pipeline.sources.data import ArraySplit, Splits
    from edge_pipeline.stages.device_test import test_targets

    out, metrics, profiles = lowered
    few = Splits(digits.train, digits.val, ArraySplit((digits.test.x[:20],), digits.test.y[:20]), digits.classes,
                 digits.source)
    return test_targets(out, metrics, profiles, devices, evaluator_for(_model(), few), threads=1, runs=5, warmup=1,
                        timeout=timeout)


def test_local_device_measures_every_target(lowered, digits):
    res = _test(lowered, digits, ["local"])
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

    from edge_pipeline.devices.runner import RUNNER_PATH

    out, metrics, _ = lowered
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.zeros((2, 1, 8, 8), np.float32))
    artifact = out / metrics["targets"]["ort-mobile-fp32"]["artifact"]
    for flags, cores in ((["--pin"], 1), ([], len(os.sched_getaffinity(0)))):
        subprocess.run([sys.executable, str(RUNNER_PATH), str(artifact), str(inputs), str(tmp_path / "r.json"),
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

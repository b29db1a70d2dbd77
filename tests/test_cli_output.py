"""The command line is quiet: the pipeline's own lines on the terminal, other libraries' output in each stage's
log.txt, and on a failure the log's last lines and its path."""

import torch
from edge_support import run_cli
from torch import nn

from edge_pipeline.sources.zoo import DigitsCNN

NOISE = "chatter-from-a-library"


class NoisyOnBigBatches(DigitsCNN):
    """Prints like a third-party library, and fails on a batch bigger than the 2-row example it is checked with
    before any work, so it fails inside the teacher stage's evaluation."""

    def forward(self, x):
        if x.shape[0] > 2:
            print(NOISE, flush=True)
            raise RuntimeError("the kernel refused this batch")
        return super().forward(x)


def noisy_on_big_batches() -> nn.Module:
    torch.manual_seed(0)
    return NoisyOnBigBatches()


def test_a_run_prints_only_the_pipelines_lines_and_logs_the_rest(write_recipe, tmp_path):
    recipe = write_recipe(train={"epochs": 1}, targets=["tflite-int8", "executorch-xnnpack-int8"],
                          devices=["local"], device_test={"runs": 3, "warmup": 1}, package={"enabled": False})
    res = run_cli("run", recipe, timeout=900)
    said = res.stdout + res.stderr
    assert res.returncode in (0, 1), said[-3000:]
    lines = said.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n{said}"
    for noise in ("LiteRT-Torch", "FutureWarning", "Resetting threadpool", "flatbuffer", "Warning:"):
        assert noise not in said, noise
    lower_log = next((tmp_path / "runs").rglob("06-lower/log.txt"))
    assert lower_log.stat().st_size > 0, "the libraries' output went to the stage's log"
    verbose = run_cli("--verbose", "run", recipe, "--from-stage", "lower", timeout=900)
    assert len((verbose.stdout + verbose.stderr).splitlines()) > len(lines), "--verbose streams it"


def test_a_failing_stage_shows_the_last_lines_of_its_log_and_where_it_is(write_recipe, tmp_path):
    recipe = write_recipe(model="test_cli_output:noisy_on_big_batches")
    res = run_cli("run", recipe, timeout=600)
    assert res.returncode == 3, res.stderr[-3000:]
    assert NOISE in res.stderr and "the kernel refused this batch" in res.stderr
    log = next((tmp_path / "runs").rglob("failed-*teacher.log"))
    assert NOISE in log.read_text() and f"log: {log}" in " ".join(res.stderr.split())
    assert "stage teacher failed" in res.stderr and "Traceback" in log.read_text(), "the crash is named and logged"
    report = (log.parent / "report.html").read_text()
    assert "The run failed</b> in stage teacher" in report and "the kernel refused this batch" in report

"""An arm64 board on this x86 machine (scripts/arm-board.sh: Debian arm64 python under qemu-user), reached over
ssh like any board: the arm-optimized .ort runs on ARM kernels, where it belongs."""

import os

import pytest
from edge_support import ROOT
from test_devices import _model, _test
from test_ssh_device import _spec, sshd  # noqa: F401  (fixture)

BOARD = ROOT / ".arm-board" / "python"
UNAVAILABLE = ROOT / ".arm-board-unavailable"  # .ci/run writes why it could not build the board here
# `make arm-board` builds it; in CI a board that is neither there nor explained fails the test.
_why = UNAVAILABLE.read_text().strip()[-300:] if UNAVAILABLE.is_file() else "run `make arm-board` first (needs root)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not BOARD.exists() and (UNAVAILABLE.is_file() or not os.environ.get(
    "CI")), reason=f"no emulated arm64 board: {_why}")]


def test_arm_ort_file_runs_on_arm_kernels_with_parity(sshd, digits, tmp_path):  # noqa: F811
    from edge_support import evaluator_for

    from edge_pipeline.stages.lower import lower_all
    from edge_pipeline.targets import load_profile

    model = _model()
    profiles = [load_profile(p) for p in ("ort-mobile-int8", "ort-x86-int8", "tflite-int8")]
    lowered = (tmp_path, lower_all(model, profiles, evaluator_for(model, digits), digits.train.x[:64], tmp_path),
               profiles)
    d, port = sshd
    spec = _spec(d, port, python=BOARD)
    res = _test(lowered, digits, ["local", spec], timeout=300)["results"]
    arm, here = res["ort-mobile-int8"][spec], res["ort-mobile-int8"]["local"]
    assert "error" not in arm, arm
    assert arm["conditions"]["arch"] == "aarch64" and arm["emulated"] is True
    # The arm file on an arm board: no platform note; the emulation is said instead.
    assert not any("optimized for" in n for n in arm["notes"]) and any("emulated" in n for n in arm["notes"])
    # Parity with PyTorch on ARM kernels: as close to the teacher as the same file is on x86.
    assert arm["agreement_with_teacher"]["worst"]["cosine"] > 0.98, arm["agreement_with_teacher"]
    assert abs(arm["test_metric"] - here["test_metric"]) <= 0.1
    assert 0 < arm["memory"]["model_bytes"] < 256 * 2**20
    x86_on_arm = res["ort-x86-int8"][spec]
    assert any("optimized for amd64, measured on aarch64" in n for n in x86_on_arm["notes"]), x86_on_arm
    tfl = res["tflite-int8"][spec]["error"]
    assert "runtime not available on this board (aarch64)" in tfl, tfl

"""Representative sets: drawn from train only, stratified, pinned, checked before use."""

import json

import numpy as np
import pytest
from edge_support import evaluator_for

from edge_pipeline.errors import PipelineError
from edge_pipeline.stages.calibrate import draw, load_set, provenance, write_set


def test_draw_is_seeded_stratified_and_from_train_only(digits):
    (x1,), y1, sampling = draw(digits, 100, seed=3)
    (x2,), _, _ = draw(digits, 100, seed=3)
    assert np.array_equal(x1, x2) and sampling == "stratified by class"
    counts = np.bincount(y1, minlength=10)
    assert counts.min() >= 8 and counts.max() <= 12
    train_rows = {r.tobytes() for r in digits.train.x}
    assert all(r.tobytes() in train_rows for r in x1)


def test_pinned_set_roundtrip_and_tamper_detection(digits, tmp_path):
    x, y, s = draw(digits, 64, seed=0)
    prov = write_set(tmp_path / "set", x, y, provenance(digits, x, y, 0, s))
    loaded, prov2 = load_set(tmp_path / "set", digits)
    assert np.array_equal(loaded[0], x[0]) and prov2["sha256"] == prov["sha256"]
    assert prov["class_histogram"]["0"] >= 5 and prov["split"] == "train"
    np.savez(tmp_path / "set.npz", input_0=x[0] * 2, y=y)
    with pytest.raises(PipelineError, match="does not match the sha256"):
        load_set(tmp_path / "set", digits)


def _pin(tmp_path, digits, x, **prov_over):
    prov = {**provenance(digits, (x,), None, 0, "test"), **prov_over}
    write_set(tmp_path / "bad", (x,), None, prov)
    return tmp_path / "bad"


@pytest.mark.parametrize("make, message", [
    (lambda d: d.train.x[:8, :, :4, :4].copy(), "input shape"),
    (lambda d: d.train.x[:8].astype(np.float64), "dtype float64"),
    (lambda d: d.train.x[:0], "empty"),
    (lambda d: d.test.x[:8], "of the evaluation split"),
])
def test_bad_sets_are_clear_errors(digits, tmp_path, make, message):
    base = _pin(tmp_path, digits, make(digits))
    with pytest.raises(PipelineError, match=message):
        load_set(base, digits)


def test_set_labelled_as_drawn_from_test_split_is_refused(digits, tmp_path):
    base = _pin(tmp_path, digits, digits.train.x[:8])
    prov = json.loads(base.with_suffix(".json").read_text())
    prov["split"] = "test"
    base.with_suffix(".json").write_text(json.dumps(prov))
    with pytest.raises(PipelineError, match="drawn from the 'test' split"):
        load_set(base, digits)


@pytest.mark.parametrize("backend, method", [("executorch", "entropy"), ("tflite", "percentile")])
def test_method_a_backend_cannot_do_is_an_error_naming_both(backend, method):
    from edge_pipeline.backends.pt2e import activation_observer

    with pytest.raises(PipelineError, match=f"calibration method '{method}' is not available for backend "
                                            f"'{backend}'") as e:
        activation_observer(method, backend)
    assert "histogram" in e.value.hint


def test_ort_refuses_histogram(digits, tmp_path):
    import torch

    from edge_pipeline.backends import onnxruntime as ort_backend
    from edge_pipeline.sources import build_model
    from edge_pipeline.targets import load_profile

    p = load_profile("ort-mobile-int8")
    p = p.model_copy(update={"quantization": p.quantization.model_copy(update={"method": "histogram"})})
    model = build_model("zoo:digits-cnn", 10, 1, width=0.25).eval()
    with pytest.raises(PipelineError, match="'histogram' is not available for backend 'onnxruntime'"):
        ort_backend.export(model, (torch.from_numpy(digits.test.x[:1]),), (digits.train.x[:4],), p, tmp_path,
                           evaluator_for(model, digits).iface)

"""The stage and backend contracts: every listing comes from the registries, a stage and a backend added from
outside the package run, are cached and reported like the built-in ones, and OpenVINO (added through the
backend contract alone) works end to end."""

import json
import tarfile
import types

import pytest
import torch
import yaml

from edge_pipeline import backends
from edge_pipeline.backends import Backend, artifact_files, get_backend, register, unregister
from edge_pipeline.errors import PipelineError


def test_every_listing_comes_from_the_registry():
    from edge_pipeline.doctor import backend_status
    from edge_pipeline.runstore import toolchain_versions
    from edge_pipeline.starter import default_targets
    from edge_pipeline.targets import list_profiles

    names = set(backends.backends())
    assert {"executorch", "onnxruntime", "tflite", "openvino"} <= names
    assert set(backend_status()) == names
    assert set(default_targets()) == {t for b in backends.backends().values() for t in b.BACKEND.targets}
    assert {p.backend for p in list_profiles()} == names
    assert "nncf" in toolchain_versions() and "executorch" in toolchain_versions()
    with pytest.raises(PipelineError, match="unknown backend 'nope'") as e:
        get_backend("nope")
    assert "known: executorch, onnxruntime, openvino, tflite" in e.value.hint


def test_a_profile_is_refused_for_what_its_backend_cannot_do(tmp_path):
    from edge_pipeline.targets import load_profile

    for doc, words in (({"backend": "nope", "precision": "fp32"}, "unknown backend 'nope'"),
                       ({"backend": "openvino", "precision": "int8", "quantization": {"method": "entropy"}},
                        "backend openvino calibrates with minmax, not entropy"),
                       ({"backend": "executorch", "precision": "fp32", "platform": "amd64"}, None)):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "p", **doc}))
        if words is None:
            assert load_profile(str(path)).backend == "executorch"  # platform matters to ORT only
            continue
        with pytest.raises(PipelineError, match=words):
            load_profile(str(path))


def _plain_onnx_backend() -> types.ModuleType:
    """A backend written in a test: float ONNX files, run by the harness's ONNX Runtime module."""
    mod = types.ModuleType("plain_onnx_backend")

    def export(model, example, calibration, profile, out_dir, iface, float_layers=(), default_flow=False,
               fixtures=True, qat=None):
        path = out_dir / "model.onnx"
        torch.onnx.export(model.eval(), example, str(path), dynamo=True, input_names=iface.input_names,
                          output_names=iface.output_names).save(str(path), external_data=False)
        (out_dir / "describe.json").write_text(json.dumps({"backend": "plain-onnx", **iface.to_dict(),
                                                           "coverage": "float ONNX, nothing quantized"}))
        return path

    mod.export = export
    mod.describe = lambda path: json.loads((path.parent / "describe.json").read_text())
    mod.write_fixtures = lambda path, example, iface: None
    mod.BACKEND = Backend("plain-onnx", "float ONNX for a test", ".onnx", packages=("onnxruntime",),
                          targets=("plain-onnx-fp32", "plain-onnx-fp32"), precisions=("fp32",), float_layers=False)
    return mod


def _audit_stage() -> types.ModuleType:
    """A stage written in a test, between qat and lower: reads the model through the run context."""
    from edge_pipeline.stages import Stage

    mod = types.ModuleType("audit_stage")

    def run(ctx, out):
        model, _ = ctx.model()
        (out / "audit.txt").write_text("checked\n")
        return {"params_seen": sum(p.numel() for p in model.parameters()),
                "calibration_rows": len(ctx.calibration()[0])}

    mod.run = run
    mod.STAGE = Stage("audit", 4.5, ("teacher", "calibrate"), lambda r: {"targets": r.targets},
                      summary_keys=("params_seen",), card=lambda a, m: f"- **audit**: saw {a['params_seen']} params.")
    return mod


@pytest.fixture
def plugins():
    from edge_pipeline import stages

    register(_plain_onnx_backend())
    stages.register(_audit_stage())
    yield
    unregister("plain-onnx")
    stages.unregister("audit")


def test_a_stage_and_a_backend_from_outside_the_package_run_are_cached_and_reported(plugins, write_recipe, tmp_path):
    from edge_pipeline.pipeline import run
    from edge_pipeline.stages import stage_names

    profile = tmp_path / "plain-onnx-fp32.yaml"
    profile.write_text(yaml.safe_dump({"name": "plain-onnx-fp32", "backend": "plain-onnx", "precision": "fp32",
                                       "budgets": {"max_accuracy_drop": 0.0}}))
    recipe = write_recipe(train={"epochs": 1}, targets=[str(profile)], devices=["local"], calibrate={"samples": 16},
                          device_test={"runs": 3, "warmup": 1}, package={"dist": str(tmp_path / "dist")})
    first = run(recipe)
    assert stage_names().index("audit") == stage_names().index("lower") - 1
    assert first.stages["audit"]["status"] == "ran" and first.stages["audit"]["metrics"]["calibration_rows"] > 0
    assert (first.run_dir / "06-audit" / "audit.txt").is_file()
    target = first.stages["lower"]["metrics"]["targets"]["plain-onnx-fp32"]
    assert target["backend"] == "plain-onnx" and target["parity_ok"] and not target.get("failures")
    run_dir = first.run_dir
    assert "float ONNX, nothing quantized" in (run_dir / "report.html").read_text()
    again = run(recipe)
    assert again.stages["lower"]["status"] == "reused" and again.stages["audit"]["status"] == "reused"
    assert again.stages["package"]["status"] in ("ran", "reused"), again.stages["package"]
    with tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))) as tar:
        assert any(n.endswith("plain-onnx-fp32/model.onnx") for n in tar.getnames())
        card = tar.extractfile(next(n for n in tar.getnames() if n.endswith("MODEL_CARD.md"))).read().decode()
    assert "- **audit**: saw " in card


def test_openvino_lowers_int8_with_its_weights_file_and_runs_on_a_device(digits, tmp_path):
    """OpenVINO's IR is two files: both are the artifact's size, both go to the device, and the runner (copied
    with its runtime modules) measures it in a process of its own."""
    from edge_support import evaluator_for

    from edge_pipeline.sources import build_model
    from edge_pipeline.stages.device_test import measure_targets
    from edge_pipeline.stages.lower import lower_all
    from edge_pipeline.targets import load_profile

    torch.manual_seed(0)
    model = build_model("zoo:digits-cnn", 10, 1, width=0.25).eval()
    profiles = [load_profile("openvino-cpu-int8"), load_profile("openvino-cpu-fp32")]
    ev = evaluator_for(model, digits)
    metrics = lower_all(model, profiles, ev, digits.train.x[:64], tmp_path)
    for p in profiles:
        t = metrics["targets"][p.name]
        assert t["parity_ok"], t
        xml = tmp_path / t["artifact"]
        assert [f.name for f in artifact_files(xml)] == ["model.xml", "model.bin"]
        assert t["size_bytes"] == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    int8 = metrics["targets"]["openvino-cpu-int8"]
    assert int8["describe"]["ops"].get("FakeQuantize", 0) > 0
    weights = {t: (tmp_path / metrics["targets"][t]["artifact"]).with_suffix(".bin").stat().st_size
               for t in ("openvino-cpu-int8", "openvino-cpu-fp32")}
    assert weights["openvino-cpu-int8"] < 0.3 * weights["openvino-cpu-fp32"], "int8 weights in the .bin"
    res = measure_targets(tmp_path, metrics, profiles, ["local"], ev, threads=1, runs=3, warmup=1, timeout=120)
    m = res["results"]["openvino-cpu-int8"]["local"]
    assert m["runtime"] == "openvino" and m["size_bytes"] == int8["size_bytes"], m


def test_openvino_builds_the_same_bytes_twice_and_refuses_float_layers(digits, tmp_path):
    """Two builds in one process give one IR byte for byte (OpenVINO names ops from a process-wide counter
    otherwise); layers to keep in float are refused with the reason, as the capability says."""
    from edge_pipeline.backends import openvino
    from edge_pipeline.interface import FlatModel, discover
    from edge_pipeline.sources import build_model
    from edge_pipeline.targets import load_profile

    torch.manual_seed(0)
    model = build_model("zoo:digits-cnn", 10, 1, width=0.25).eval()
    iface = discover(model, (digits.train.x[:1],))
    example = (torch.from_numpy(digits.train.x[:1]),)
    profile = load_profile("openvino-cpu-int8")
    digests = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        path = openvino.export(FlatModel(model), example, (digits.train.x[:32],), profile, out, iface)
        digests.append(path.read_bytes() + path.with_suffix(".bin").read_bytes())
    assert digests[0] == digests[1]
    assert not openvino.BACKEND.float_layers
    with pytest.raises(PipelineError, match="openvino has no float_layers: OpenVINO's conversion fuses"):
        openvino.export(FlatModel(model), example, (digits.train.x[:32],), profile, tmp_path / "0", iface,
                        float_layers=("features.0.0",))

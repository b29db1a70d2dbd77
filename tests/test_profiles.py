"""Per-operator profiles from each runtime's own profiler, and what they are used for: no float pad and no
convert left inside an int8 ExecuTorch graph."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_pipeline.backends import get_backend
from edge_pipeline.harness import runner
from edge_pipeline.interface import FlatModel, discover
from edge_pipeline.profiles import overhead_line, summarize
from edge_pipeline.targets import load_profile


class PadThenDepthwise(nn.Module):
    """TF-style "same" padding: an explicit zero pad before a depthwise convolution, asymmetric before a strided
    one (the default), symmetric at stride 1."""

    def __init__(self, pad=(0, 1, 0, 1), stride: int = 2):
        super().__init__()
        self.pad = pad
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=stride, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.pw(F.relu(self.dw(F.pad(x, self.pad))))


def _lowered(tmp_path, target: str, model: nn.Module, x: np.ndarray, float_layers=()):
    iface = discover(model, (x[:1],))
    out = tmp_path / target
    out.mkdir()
    path = get_backend(load_profile(target).backend).export(FlatModel(model), (torch.from_numpy(x[:1]),), (x,),
                                                           load_profile(target), out, iface,
                                                           float_layers=float_layers, fixtures=False)
    return path


def _cosine_with_float(path, model: nn.Module, x: np.ndarray) -> float:
    """The artifact at batch 1, as it ships, against the float model on the same rows."""
    artifact = runner.Model(str(path), 1)
    got = np.concatenate([artifact.run([x[i:i + 1]])[0] for i in range(len(x))])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    return float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def pad_model():
    torch.manual_seed(0)
    return PadThenDepthwise().eval(), np.random.default_rng(0).random((48, 3, 16, 16), dtype=np.float32)


@pytest.mark.parametrize("target", ["executorch-xnnpack-int8", "ort-mobile-int8", "openvino-cpu-int8"])
def test_each_runtime_profiles_its_own_operators(pad_model, tmp_path, target):
    model, x = pad_model
    path = _lowered(tmp_path, target, model, x)
    prof = runner.op_profile(str(path), [x[:1]], threads=1, runs=3)
    assert "ops" in prof, prof
    assert all(o["ms"] >= 0 and o["kind"] for o in prof["ops"])
    kinds = " ".join(o["kind"] for o in prof["ops"])
    assert "onv" in kinds, kinds  # Convolution / QLinearConv / ConvInteger: the model's own ops are there
    s = summarize(prof["ops"])
    assert s["total_ms"] > 0 and 0 <= s["overhead_share"] <= 1 and s["top_kinds"][0]["share"] > 0
    assert overhead_line(target, "local", {**prof, "summary": s}).startswith(f"{target} on local: ")


def test_litert_says_it_has_no_profile_here(pad_model, tmp_path):
    model, x = pad_model
    path = _lowered(tmp_path, "tflite-int8", model, x)
    prof = runner.op_profile(str(path), [x[:1]], threads=1)
    assert prof["unavailable"].startswith("no per-operator profile for .tflite files on this device kind")


def test_a_pad_before_a_strided_conv_runs_int8_in_executorch(pad_model, tmp_path):
    """The pad goes into the convolution (XNNPACK takes asymmetric padding): the profile has no pad and no
    convert but the input's quantize and the output's dequantize; the outputs still match the float model."""
    model, x = pad_model
    path = _lowered(tmp_path, "executorch-xnnpack-int8", model, x)
    ops = runner.op_profile(str(path), [x[:1]], threads=1, runs=3)["ops"]
    assert not [o for o in ops if o["overhead"] == "pad"], ops
    assert len([o for o in ops if o["overhead"] == "convert"]) == 2, [o["name"] for o in ops]
    cos = _cosine_with_float(path, model, x[:8])
    assert cos > 0.99, cos


def test_a_symmetric_pad_before_a_conv_kept_in_float_becomes_its_padding(tmp_path):
    """The accuracy fallback's float conv takes its pad as its own padding: no float pad between two converts,
    only the input's quantize and the dequantize into the float conv (the output layer after it reads its float
    output); the outputs still match the float model."""
    torch.manual_seed(0)
    model = PadThenDepthwise(pad=(1, 1, 1, 1), stride=1).eval()
    x = np.random.default_rng(0).random((48, 3, 16, 16), dtype=np.float32)
    path = _lowered(tmp_path, "executorch-xnnpack-int8", model, x, float_layers=("dw",))
    ops = runner.op_profile(str(path), [x[:1]], threads=1, runs=3)["ops"]
    names = [o["name"] for o in ops]
    assert any("F32" in o["kind"] and "DWConv" in o["kind"] for o in ops), names  # dw really is float
    assert not [o for o in ops if o["overhead"] == "pad"], names
    assert len([o for o in ops if o["overhead"] == "convert"]) == 2, names
    cos = _cosine_with_float(path, model, x[:8])
    assert cos > 0.99, cos


class ResidualsAfterPad(nn.Module):
    """A TF-style pad before a strided depthwise convolution, then two residual adds in a row (the second
    reads the first), as in EfficientNet's stages."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.pw = nn.ModuleList(nn.Conv2d(16, 16, 1) for _ in range(3))

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.pw[0](F.relu(self.dw(F.pad(x, (0, 1, 0, 1)))))
        a = y + self.pw[1](F.relu(y))
        return a + self.pw[2](F.relu(a))


def test_litert_int8_keeps_pads_and_residual_adds_in_int8_nhwc(tmp_path):
    """No layout transposes around the pad (it folds into its convolution, as in fp32) and no float island
    around the second add: the int8 file has the fp32 file's ops and the outputs still match."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    torch.manual_seed(0)
    model, x = ResidualsAfterPad().eval(), np.random.default_rng(0).random((48, 3, 16, 16), dtype=np.float32)
    kinds = {}
    for target in ("tflite-int8", "tflite-fp32"):
        it = Interpreter(model_path=str(_lowered(tmp_path, target, model, x)),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        kinds[target] = sorted(o["op_name"] for o in it._get_ops_details())
    assert kinds["tflite-int8"] == kinds["tflite-fp32"], "\n".join(map(str, kinds.values()))
    assert "QUANTIZE" not in kinds["tflite-int8"] and "DEQUANTIZE" not in kinds["tflite-int8"]
    artifact = runner.Model(str(tmp_path / "tflite-int8" / "model.tflite"), 1)
    got = np.concatenate([artifact.run([x[i:i + 1]])[0] for i in range(8)])
    with torch.no_grad():
        want = model(torch.from_numpy(x[:8])).numpy()
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.99, cos


def test_ort_x86_int8_runs_every_conv_and_add_in_int8(tmp_path):
    """x86 files take uint8 activations: ORT's optimizer then fuses every conv and residual add into int8 kernels
    (with int8 activations it left a projection conv and both adds in float between dequantize and quantize)."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model, x = ResidualsAfterPad().eval(), np.random.default_rng(0).random((48, 3, 16, 16), dtype=np.float32)
    path = _lowered(tmp_path, "ort-x86-int8", model, x)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "ort-x86-int8" / "model.onnx"), options,
                         providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert kinds.count("QLinearConv") == 5 and kinds.count("QLinearAdd") == 2, kinds
    assert not {"Conv", "Add"} & set(kinds), kinds
    got = np.concatenate([runner.Model(str(path), 1).run([x[i:i + 1]])[0] for i in range(8)])
    with torch.no_grad():
        want = model(torch.from_numpy(x[:8])).numpy()
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.99, cos

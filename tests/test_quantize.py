"""Int8 that is right on real CNNs: bounded activations fused into the op before them (ExecuTorch's PT2E path)."""

import numpy as np
import pytest
import torch
from torch import nn

from edge_pipeline.backends import pt2e
from edge_pipeline.backends.executorch import _quantizer
from edge_pipeline.interface import FlatModel
from edge_pipeline.targets import load_profile


class ConvReLU6(nn.Module):
    """Conv + BN + ReLU6 written three ways, as real models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 1)
        for bn in (self.b1, self.b2):  # a wide pre-activation range, as after real training
            bn.weight.data.uniform_(2, 6)
            bn.bias.data.uniform_(-8, 4)

    def forward(self, x):
        x = torch.clamp(self.b1(self.c1(x)), 0, 6)
        x = nn.functional.relu6(self.b2(self.c2(x)))
        return nn.functional.hardtanh(self.c3(x), 0.0, 6.0).mean((2, 3))


def _annotated(model, calibration):
    gm, _ = pt2e.export_for_calibration(model, calibration)
    pt2e.canonicalize_clamps(gm)
    return gm


def test_clamps_become_hardtanh_and_their_conv_output_is_not_quantized():
    model = FlatModel(ConvReLU6().eval())
    cal = (np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32),)
    gm = _annotated(model, cal)
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.clamp.default" not in ops and ops.count("aten.hardtanh.default") == 3
    q = _quantizer(load_profile("executorch-xnnpack-int8"), ())
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    prepared = prepare_pt2e(gm, q)
    convs = [n for n in prepared.graph.nodes if str(n.target) == "aten.conv2d.default"]
    # No observer sits between a conv and its activation: each conv's only user is the activation itself.
    assert convs and all([str(u.target) for u in c.users] == ["aten.hardtanh.default"] for c in convs)


def test_fused_int8_keeps_the_post_activation_resolution():
    model = FlatModel(ConvReLU6().eval())
    rng = np.random.default_rng(1)
    cal = (rng.standard_normal((64, 3, 8, 8)).astype(np.float32),)
    x = torch.from_numpy(rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    ref = model(x)[0]
    profile = load_profile("executorch-xnnpack-int8")

    def sqnr(quantizer):
        out = pt2e.quantize(model, cal, quantizer)(x)[0]
        return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))

    fused = sqnr(_quantizer(profile, ()))
    unfused = sqnr(_quantizer(profile, ()).inner)
    assert fused > unfused + 3, (fused, unfused)


class SqueezeExcite(nn.Module):
    """torchvision's MobileNetV3 gate: a global-average-pool squeeze, fc1, ReLU, fc2, hardsigmoid, multiply; the
    feature map it gates spans a far wider range than its mean, and fc2's logits reach past +-3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.fc2.weight.data.mul_(30)  # gate logits well past +-3, as after training

    def forward(self, x):
        x = nn.functional.relu(self.conv(x))  # as in torchvision's first block (the pool reads an int8 tensor)
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))
        return (x * s).flatten(1)


@pytest.mark.parametrize("backend", ["executorch", "tflite"])
def test_squeeze_excite_gets_its_own_pool_range_and_gate_logits_clipped_to_where_hardsigmoid_changes(backend):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from edge_pipeline.backends import executorch, tflite

    model = FlatModel(SqueezeExcite().eval())
    rng = np.random.default_rng(0)
    cal = (rng.standard_normal((32, 3, 8, 8)).astype(np.float32) * 3,)
    profile = load_profile("executorch-xnnpack-int8" if backend == "executorch" else "tflite-int8")
    q = executorch._quantizer(profile, ()) if backend == "executorch" else tflite._quantizers(profile, ())[1]
    gm, _ = pt2e.export_for_calibration(model, cal)
    prepared = prepare_pt2e(gm, q)
    prepared(torch.from_numpy(cal[0]))
    observer = {n.name: prepared.get_submodule(n.target) for n in prepared.graph.nodes if n.op == "call_module"}
    pool = next(n for n in prepared.graph.nodes if "adaptive_avg_pool2d" in str(n.target))
    pool_in, pool_out = pool.args[0], next(iter(pool.users))
    assert observer[pool_in.name] is not observer[pool_out.name], "the mean has a range of its own"
    assert float(observer[pool_out.name].max_val) < float(observer[pool_in.name].max_val) / 2
    gate_in = next(n for n in prepared.graph.nodes if "hardsigmoid" in str(n.target)).args[0]
    assert float(observer[gate_in.name].max_val) > 3  # calibration saw logits beyond the gate's range
    assert pt2e.clip_to_activation_domains(prepared) >= 1
    lo, hi = float(observer[gate_in.name].min_val), float(observer[gate_in.name].max_val)
    assert -3 <= lo and hi <= 3, (lo, hi)


@pytest.mark.slow
def test_real_pretrained_mobile_cnn_keeps_its_top1_in_int8():
    """EfficientNet-Lite0 with its published weights, on held-out crops of real photographs: the PT2E int8 model
    that ExecuTorch lowers agrees with the float model's top-1 (53% before the ReLU6 fusion)."""
    from edge_pipeline.evaluation import predict
    from edge_pipeline.sources import load_data
    from edge_pipeline.sources.data import ArraySplit
    from edge_pipeline.sources.pretrained import efficientnet_lite0

    data = load_data("edge_pipeline.sources.pretrained:photos")
    model = FlatModel(efficientnet_lite0())
    test = ArraySplit(data.test.rows(np.arange(0, len(data.test), 2)), None)
    ref = predict(model, test)[0].argmax(1)
    cal = data.train.rows(np.arange(0, len(data.train), 3))
    gm = pt2e.quantize(model, cal, _quantizer(load_profile("executorch-xnnpack-int8"), ()))
    with torch.no_grad():
        out = np.concatenate([gm(*[torch.from_numpy(a) for a in xs])[0].numpy() for xs, _ in test.batches(32)])
    out = out.argmax(1)
    assert (out == ref).mean() >= 0.75


class Eleven(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*[nn.Linear(8, 8) for _ in range(11)])

    def forward(self, x):
        return self.features(x)


def test_ort_float_fallback_matches_module_paths_exactly(tmp_path):
    """features.1 must not also match features.10 (a substring match did), and the names survive
    quant_pre_process, which drops the node metadata the paths are read from."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_pipeline.backends.onnxruntime import _float_onnx, nodes_kept_float, onnx_nodes_for
    from edge_pipeline.interface import discover

    model = FlatModel(Eleven().eval())
    iface = discover(model, (np.zeros((2, 8), np.float32),))
    _float_onnx(model, (torch.zeros(1, 8),), tmp_path / "f.onnx", iface)
    names = onnx_nodes_for(tmp_path / "f.onnx", ["features.1"])
    assert names and all("10" not in n for n in names), names
    by_path = {n.name: n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node}
    from edge_pipeline.backends.onnxruntime import module_paths

    assert all("model.features.1" in module_paths(by_path[n]) for n in names)
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"))
    kept = nodes_kept_float(tmp_path / "f.onnx", tmp_path / "pre.onnx", ["features.1"])
    pre = {n.name: n for n in onnx.load(str(tmp_path / "pre.onnx")).graph.node}
    assert kept and all("model.features.1.weight" in pre[n].input for n in kept if pre[n].op_type == "Gemm")


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x))))).mean((2, 3))


def test_ort_float_fallback_finds_convs_that_batchnorm_folding_renamed(tmp_path):
    """quant_pre_process folds each BatchNorm into its conv under a new node name: the conv is still found, by
    the weight it reads, and only that conv."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_pipeline.backends.onnxruntime import _float_onnx, nodes_kept_float
    from edge_pipeline.interface import discover

    model = FlatModel(ConvBN().eval())
    iface = discover(model, (np.zeros((2, 3, 8, 8), np.float32),))
    _float_onnx(model, (torch.zeros(1, 3, 8, 8),), tmp_path / "f.onnx", iface)
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"))
    convs = {n.name: n for n in onnx.load(str(tmp_path / "pre.onnx")).graph.node if n.op_type == "Conv"}
    kept = nodes_kept_float(tmp_path / "f.onnx", tmp_path / "pre.onnx", ["c2"])
    assert len(convs) == 2 and [n for n in kept if n in convs] and all(
        "model.c2.weight" in convs[n].input for n in kept if n in convs)


class BatchSized(nn.Module):
    """Reads the batch size (as real models' views do): a dynamic-batch export logs it as a symbolic int."""

    def forward(self, x):
        return x.reshape(x.size(0), -1)


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_one_pass_layer_error_blames_the_layer_with_the_outlier_weight(backend):
    """A huge weight on an input that is always 0 leaves the float model as it was but ruins that layer's int8
    weight scale (as in the digits fallback test); the layers around it are not blamed. Measured by each
    runtime's own debugger (torchao's numeric debugger, ORT's qdq_loss_debug) on one calibrated build."""
    from edge_pipeline.backends import get_backend
    from edge_pipeline.interface import discover
    from edge_pipeline.targets import load_profile

    torch.manual_seed(0)
    # (a ReLU last: a Linear that makes an output directly is kept out of static int8 by design)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4),
                          nn.ReLU(), BatchSized()).eval()
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 0.0, -1.0  # unit 0 is always 0 after the ReLU
        model[2].weight[:, 0] = 500.0
    rng = np.random.default_rng(0)
    cal, rows = ((rng.standard_normal((64, 16)).astype(np.float32),) for _ in range(2))
    flat = FlatModel(model)
    iface = discover(flat, (cal[0][:2],))
    profile = load_profile("executorch-xnnpack-int8" if backend == "executorch" else "ort-mobile-int8")
    err = get_backend(backend).layer_errors(flat, (torch.from_numpy(cal[0][:1]),), cal, rows, profile, iface)
    assert set(err) == {"0", "2", "4"} and min(err, key=err.get) == "2", err
    assert err["2"] < min(err["0"], err["4"]) - 10


def test_blame_charges_each_layer_its_own_noise_and_not_what_it_was_fed():
    from edge_pipeline.layer_error import NO_ERROR_DB, blame

    ops = [("conv", "c1", None), ("relu", None, "conv"), ("view", None, "relu"), ("fc", "f2", "view"),
           ("fc2", "f3", "fc")]
    # c1 adds 1e-4 (40 dB), its ReLU's rounding 1e-4 more; the unlogged view passes that on; f2 adds 8e-4;
    # f3 is fed noise past the signal (0 dB) by a broken f2 and is not blamed for it.
    got = blame(ops, {"conv": 40.0, "relu": 10 * np.log10(1 / 2e-4), "fc": 30.0, "fc2": -3.0})
    assert got["c1"] == pytest.approx(10 * np.log10(1 / 2e-4)) and got["f2"] == pytest.approx(
        -10 * np.log10(1e-3 - 2e-4))
    assert got["f3"] == pytest.approx(-10 * np.log10(1 - 1e-3))
    broken = blame(ops, {"conv": 40.0, "fc": -5.0, "fc2": -8.0})
    assert broken["f2"] < 0.1 and broken["f3"] == NO_ERROR_DB


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_a_healthy_conv_bn_model_has_no_layer_to_blame(backend):
    """BatchNorm with real statistics is folded into its conv by the quantizer: the float side must be folded
    alike, or every conv reads as broken (EfficientNet's did, at 0 dB)."""
    from edge_pipeline.backends import get_backend
    from edge_pipeline.interface import discover
    from edge_pipeline.targets import load_profile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.2, 4)
            bn.weight.uniform_(0.5, 3)
            bn.bias.uniform_(-1, 1)
    flat = FlatModel(net.eval())
    rng = np.random.default_rng(0)
    cal = (rng.standard_normal((64, 3, 12, 12)).astype(np.float32),)
    iface = discover(flat, (cal[0][:2],))
    profile = load_profile("executorch-xnnpack-int8" if backend == "executorch" else "ort-mobile-int8")
    err = get_backend(backend).layer_errors(flat, (torch.from_numpy(cal[0][:1]),), cal, (cal[0][:16],), profile, iface)
    # ORT keeps the output layer (8) float; ExecuTorch quantizes it dynamically
    assert set(err) == ({"0", "3", "8"} if backend == "executorch" else {"0", "3"}) and min(err.values()) > 20, err


def test_ort_files_for_x86_use_7bit_weights_and_stay_right_without_vnni(tmp_path):
    """ORT on x86 multiplies uint8 activations by int8 weights and, on AVX2 CPUs without VNNI, adds pairs of
    products in int16: full-range 8-bit weights overflow it (255*127*2 > 32767). A 1x1 conv whose inputs and
    weights are all large and positive hits that on every output; an amd64 file keeps 7-bit weights and agrees
    with the float model (on an AVX2-only host the 8-bit file's outputs come out about halved). Its depthwise
    conv keeps 8-bit weights: ORT's depthwise kernel adds in int32 on every x86 CPU."""
    import onnx
    from onnx import numpy_helper

    from edge_pipeline.backends import onnxruntime as ob
    from edge_pipeline.evaluation import run_artifact
    from edge_pipeline.interface import discover
    from edge_pipeline.sources.data import ArraySplit

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 8, 1), nn.ReLU(),
                        nn.Flatten())
    with torch.no_grad():
        net[0].weight.uniform_(0.1, 0.2)
        net[2].weight.uniform_(0.5, 1.0)
    flat = FlatModel(net.eval())
    x = np.random.default_rng(0).uniform(0.8, 1.0, (64, 32, 4, 4)).astype(np.float32)
    iface = discover(flat, (x[:2],))
    profile = load_profile("ort-mobile-int8").model_copy(update={"platform": "amd64"})
    path = ob.export(flat, (torch.from_numpy(x[:1]),), (x,), profile, tmp_path, iface, fixtures=False)
    doc = ob.describe(path)
    assert doc["weights_7bit"] and doc["depthwise_weights_8bit"] == 1
    qdq = onnx.load(str(tmp_path / "model.onnx"))
    weights = {t.dims[1]: np.abs(numpy_helper.to_array(t).astype(int)).max() for t in qdq.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4}
    assert weights[1] == 127 and weights[32] <= 64, f"8-bit depthwise weights, 7-bit 1x1 weights: {weights}"
    got = run_artifact(path, ArraySplit((x,), None), 1)[0]
    want = flat(torch.from_numpy(x))[0].detach().numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert "without VNNI" in doc["weight_bits_reason"] and "1 depthwise" in doc["weight_bits_reason"]

    vnni = tmp_path / "vnni"
    vnni.mkdir()
    path = ob.export(flat, (torch.from_numpy(x[:1]),), (x,), load_profile("ort-x86-vnni-int8"), vnni, iface,
                     fixtures=False)
    doc = ob.describe(path)
    assert not doc["weights_7bit"] and "accumulate in int32" in doc["weight_bits_reason"]
    qdq = onnx.load(str(vnni / "model.onnx"))
    weights = [numpy_helper.to_array(t) for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT8
               and t.dims and len(t.dims) == 4]
    assert max(np.abs(w.astype(int)).max() for w in weights) == 127, "full 8-bit weights for VNNI CPUs"


def test_fallback_tries_only_layers_that_carry_the_noise():
    """One broken layer among healthy ones is tried in float; noise spread evenly over many layers (as on
    EfficientNet-Lite0, worst layer ~10%) costs no export and says why."""
    from edge_pipeline.stages.lower import fallback_candidates

    one_bad = {"a": 40.0, "b": 12.0, "c": 38.0, "d": 41.0}
    assert fallback_candidates(one_bad, 3) == (["b"], None)
    two_bad = {"a": 40.0, "b": 12.0, "c": 13.0, "d": 41.0}
    assert fallback_candidates(two_bad, 3)[0] == ["b", "c"]
    spread = {f"l{i}": 17.0 + i / 10 for i in range(50)}
    candidates, why = fallback_candidates(spread, 3)
    assert candidates == [] and "spread" in why and "'l0'" in why


def test_one_float_export_serves_every_pt2e_build_until_the_model_changes(monkeypatch):
    """ExecuTorch and LiteRT int8, the fallback's trials and the per-layer error share one torch.export; each
    gets its own copy (prepare_pt2e folds BatchNorm into it), and a weight changed in place exports again."""
    calls = []
    real = pt2e._export_float
    monkeypatch.setattr(pt2e, "_export_float", lambda m, c: (calls.append(1), real(m, c))[1])
    model = FlatModel(ConvReLU6().eval())
    cal = (np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32),)
    a, batch = pt2e.export_for_calibration(model, cal)
    b, _ = pt2e.export_for_calibration(model, cal)
    assert len(calls) == 1 and batch == pt2e.CALIBRATION_BATCH
    first = [p.data_ptr() for p in a.parameters()]
    assert a is not b and first and not set(first) & {p.data_ptr() for p in b.parameters()}
    with torch.no_grad():
        model.model.c1.weight.mul_(2)
    pt2e.export_for_calibration(model, cal)
    pt2e.export_for_calibration(model, (cal[0].copy(),))
    assert len(calls) == 3


class MaskedScores(nn.Module):
    """What a transformer's attention does around its mask: int64 index arithmetic (``arange + 1``) and a mask
    of ``finfo.min`` added to the scores before the softmax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask):
        idx = (torch.arange(x.shape[1]) + 1) % x.shape[1]
        scores = self.fc(x)[:, idx]
        return (scores + (1 - mask.float()) * torch.finfo(torch.float32).min).softmax(-1)


@pytest.mark.parametrize("backend", ["executorch", "tflite"])
def test_integer_arithmetic_and_masking_sentinels_stay_unquantized(backend):
    """Before: the int64 add was annotated, its scalar became a float constant and ``index`` refused the float
    result ("tensors used as indices must be long"); and one int8 range over finfo.min left every real score
    in one step."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    mask = (np.arange(8)[None] < rng.integers(3, 9, (64, 1))).astype(np.int64)
    model = FlatModel(MaskedScores().eval())
    quantizer = _quantizer(load_profile("executorch-xnnpack-int8"), ()) if backend == "executorch" else None
    if quantizer is None:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        quantizer = pt2e.FusedActivations(PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)))
    gm = pt2e.quantize(model, (x, mask), quantizer)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(mask))[0]
        out = gm(torch.from_numpy(x[:32]), torch.from_numpy(mask[:32]))[0]
    cosine = nn.functional.cosine_similarity(out, ref[:32], dim=1)
    assert cosine.min() > 0.99, cosine.min()
    assert (out[torch.from_numpy(mask[:32]) == 0] < 1e-6).all(), "masked positions stay masked"


class WideLogits(nn.Module):
    """A classifier head whose logits reach hundreds on a few rows and stay within ~1 on the rest, as a briefly
    trained MobileNetV3's did: one static int8 range over them leaves the usual rows' logits in one step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


def test_output_layers_stay_out_of_static_int8_where_the_backend_can_keep_them(tmp_path):
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_pipeline.backends.onnxruntime import _float_onnx, output_layer_nodes
    from edge_pipeline.interface import discover

    model = FlatModel(WideLogits().eval())
    rng = np.random.default_rng(0)
    calibration = (rng.normal(size=(64, 3, 16, 16)).astype(np.float32),)
    calibration[0][:2] *= 500  # two rows whose logits are hundreds of times the others'
    rows = rng.normal(size=(64, 3, 16, 16)).astype(np.float32)
    gm, _ = pt2e.export_for_calibration(model, calibration)
    assert pt2e.output_layers(gm) == ["model.head"], "found through the flatten"

    profile = load_profile("executorch-xnnpack-int8")
    with torch.no_grad():
        ref = model(torch.from_numpy(rows))[0].argmax(1)
        agreement = {}
        for keep in (True, False):
            quantizer = _quantizer(profile, ())
            quantizer.keep_outputs = keep
            out = pt2e.quantize(model, calibration, quantizer)(torch.from_numpy(rows))[0]
            agreement[keep] = float((out.argmax(1) == ref).float().mean())
    assert agreement[True] >= 0.95 and agreement[False] < 0.8, agreement

    iface = discover(model, calibration)
    _float_onnx(model, (torch.from_numpy(rows[:1]),), tmp_path / "f.onnx", iface)
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"))
    pre = onnx.load(str(tmp_path / "pre.onnx"))
    kept = output_layer_nodes(pre)
    assert [n.op_type for n in pre.graph.node if n.name in kept] == ["Gemm"], kept

    # ORT: the head computes in float from int8 weights (a byte a weight in the file), and the rows agree
    from edge_pipeline.backends import onnxruntime as ob
    from edge_pipeline.evaluation import run_artifact
    from edge_pipeline.sources.data import ArraySplit

    (tmp_path / "ort").mkdir()
    path = ob.export(model, (torch.from_numpy(rows[:1]),), calibration, load_profile("ort-mobile-int8"),
                     tmp_path / "ort", iface, fixtures=False)
    qdq = onnx.load(str(tmp_path / "ort" / "model.onnx"))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    gemm = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    dq = producer[gemm.input[1]]
    int8 = {t.name: t for t in qdq.graph.initializer}[dq.input[0]]
    assert dq.op_type == "DequantizeLinear" and int8.data_type == onnx.TensorProto.INT8
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 for t in qdq.graph.initializer)
    got = run_artifact(path, ArraySplit((rows,), None), 1)[0].argmax(1)
    assert (got == ref.numpy()).mean() >= 0.95


def test_a_static_int8_output_takes_the_range_that_serves_the_rows():
    """Where the outputs stay int8 (LiteRT's int8 I/O), their range is fitted to the rows, not to the extremes:
    logits of a few rows a hundred times the rest's shrink it, and well-behaved logits keep min-max."""
    from torchao.quantization.pt2e import observer as obs

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 5, size=(256, 10)).astype(np.float32))
    for wide in (False, True):
        x = logits.clone()
        if wide:
            x[:3] *= 100
        observer = obs.MinMaxObserver(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
        observer(x)
        holder = nn.Module()
        holder.obs = observer
        chosen = pt2e.fit_output_ranges(holder, {"obs": [x]})["obs"]
        step = float(observer.calculate_qparams()[0])
        if wide:
            assert chosen < 1.0 and step < float(x.abs().max()) / 127 / 2, (chosen, step)
        else:
            assert chosen == 1.0, chosen


def test_ort_per_inference_convs_get_a_weight_scale_per_output_channel(tmp_path):
    """quantize_dynamic gives each ConvInteger one weight scale per tensor; after BatchNorm folding channels 1000x
    apart in scale, the small ones would round to zero. The file's conv weights are quantized per output channel
    (a [C, 1, 1] scale the float Mul after the conv broadcasts), and the small channels' outputs stay right."""
    import onnx
    from onnx import numpy_helper

    from edge_pipeline.backends import get_backend
    from edge_pipeline.harness import runner
    from edge_pipeline.interface import discover

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                        nn.BatchNorm2d(8)).eval()
    with torch.no_grad():  # output channels 1000x apart, as BatchNorm's scales leave some trained convs
        for bn in (net[1], net[4]):
            bn.weight.copy_(torch.logspace(-3, 0, 8))
    example = (torch.randn(1, 3, 8, 8),)
    calibration = (np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32),)
    path = get_backend("onnxruntime").export(FlatModel(net), example, calibration, load_profile("ort-mobile-int8"),
                                             tmp_path, discover(net, (example[0].numpy(),), None), fixtures=False,
                                             activations="dynamic")
    model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "ConvInteger"]
    assert len(convs) == 2
    for n in convs:
        scale = inits[n.input[1].removesuffix("_quantized") + "_scale"]
        assert scale.shape == (8, 1, 1) and scale.max() / scale.min() > 100, scale.ravel()
        assert np.abs(inits[n.input[1]]).max(axis=(1, 2, 3)).min() >= 126, "every channel spans the int8 grid"
    x = calibration[0][:1]
    _, outputs = runner.measure(str(path), [x], runs=2, warmup=1)
    want = net(torch.from_numpy(x)).detach().numpy()
    small = np.abs(outputs[0][:, 0] - want[:, 0]).max() / np.abs(want[:, 0]).max()
    assert small < 0.05, f"the smallest channel's error is {small:.1%} of its range"

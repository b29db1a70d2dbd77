"""What ExecuTorch and TFLite share: PT2E static int8 with a calibration method chosen per profile."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import flat_name
from edge_pipeline.targets import Profile

PT2E_METHODS = ("minmax", "moving_average", "histogram")
# Values this large are masking sentinels (an attention mask's finfo.min, -1e4, -1e9) or infinities, never
# activations: a tensor that holds them is kept in float (one int8 range over them leaves nothing of the rest).
SENTINEL = 1e4


def activation_observer(method: str, backend: str):
    from torchao.quantization.pt2e import observer as obs

    table = {"minmax": obs.MinMaxObserver, "moving_average": obs.MovingAverageMinMaxObserver,
             "histogram": obs.HistogramObserver}
    if method not in table:
        raise PipelineError(f"calibration method '{method}' is not available for backend '{backend}'",
                            where="target profile: quantization.method",
                            hint=f"{backend} (PT2E observers) supports: {', '.join(PT2E_METHODS)}")
    return table[method].with_args(eps=2 ** -12)


def configure(base_config, profile: Profile):
    """The backend quantizer's own config with the profile's activation observer and symmetry swapped in."""
    act = base_config.input_activation
    act = dataclasses.replace(
        act, observer_or_fake_quant_ctr=activation_observer(profile.quantization.method, profile.backend),
        qscheme=torch.per_tensor_symmetric if profile.quantization.symmetric_activations else torch.per_tensor_affine)
    return dataclasses.replace(base_config, input_activation=act, output_activation=act)


CALIBRATION_BATCH = 32


def int8_weight_grid(profile: Profile, activations: str = "static", left_float_when_dynamic=lambda _module: False):
    """The PT2E quantizers (XNNPACK's, litert-torch's) make int8 weights symmetric per output channel over +-127,
    scale max |w| / 127. See ``rounding``. In a per-inference build the layers ``left_float_when_dynamic`` picks
    stay float, and keep their float weights."""
    from edge_pipeline.rounding import QMAX, per_channel_grid

    return per_channel_grid(profile, lambda module: None if activations == "dynamic"
                            and left_float_when_dynamic(module) else QMAX)


_LAST_EXPORT: dict = {}  # the last float export, reused while the model and the representative set are the same


def export_for_calibration(model: nn.Module, calibration: tuple[np.ndarray, ...]) -> tuple[torch.fx.GraphModule, int]:
    """The float model as a graph module with a dynamic batch, so the representative set runs in batches (a
    batch-1 export rejects them); a model that will not export with a dynamic batch is calibrated row by row.
    Returns a fresh copy of the graph module (prepare_pt2e changes it) and the batch size it takes.

    One ``torch.export`` serves every PT2E build of a lower stage (ExecuTorch and LiteRT int8, the fallback's
    trials, the per-layer error): it is reused while the model object, its parameters' in-place versions and
    the representative set's arrays are the same."""
    import copy
    import weakref

    state = [t._version for t in (*model.parameters(), *model.buffers())]
    last = _LAST_EXPORT
    if not (last and last["model"]() is model and last["state"] == state and len(last["calibration"]) ==
            len(calibration) and all(a is b for a, b in zip(last["calibration"], calibration, strict=False))):
        program, batch = _export_float(model, calibration)
        # The arrays are held, so their ids cannot be reused by others while this entry stands.
        last.clear()
        last.update(model=weakref.ref(model), state=state, calibration=tuple(calibration), program=program,
                    batch=batch)
    return copy.deepcopy(last["program"].module()), last["batch"]


def _export_float(model: nn.Module, calibration: tuple[np.ndarray, ...]) -> tuple[torch.export.ExportedProgram, int]:
    n = min(16, len(calibration[0]))
    if n >= 2:
        example = tuple(torch.from_numpy(a[:n]) for a in calibration)
        batch = torch.export.Dim("batch", min=1, max=max(2 * CALIBRATION_BATCH, n))
        try:
            # FlatModel.forward(*inputs): one varargs parameter, whose spec is the tuple of per-input specs.
            ep = torch.export.export(model.eval(), example, dynamic_shapes=(tuple({0: batch} for _ in example),))
            return ep, CALIBRATION_BATCH
        except Exception:  # noqa: BLE001 - shape-specialized models: fall back to batch 1
            pass
    example = tuple(torch.from_numpy(a[:1]) for a in calibration)
    return torch.export.export(model.eval(), example), 1


def quantize(model: nn.Module, calibration: tuple[np.ndarray, ...], quantizer,
             fold_quantize: bool = True) -> torch.fx.GraphModule:
    """torch.export -> prepare_pt2e -> run the representative set (batched where it can) -> convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm, batch = export_for_calibration(model, calibration)
    canonicalize(gm, calibration, batch)
    gm = prepare_pt2e(gm, quantizer)
    seen = record_outputs(gm)
    with torch.no_grad():
        for i in range(0, len(calibration[0]), batch):
            gm(*[torch.from_numpy(a[i:i + batch]) for a in calibration])
    fit_output_ranges(gm, seen)
    clip_to_activation_domains(gm)
    return convert_pt2e(gm, fold_quantize=fold_quantize)


OUTPUT_RANGE_FRACTIONS = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12)


def record_outputs(prepared: torch.fx.GraphModule) -> dict[str, list[torch.Tensor]]:
    """Hooks on the observers whose outputs are the graph's outputs: what they see during calibration. An
    observer that also watches another tensor (called from more than one node) is left out: its range serves
    that tensor too."""
    out = next(n for n in prepared.graph.nodes if n.op == "output")
    calls: dict[int, int] = {}  # by the observer object: a shared quantization spec gives one object two names
    for n in prepared.graph.nodes:
        if n.op == "call_module":
            key = id(prepared.get_submodule(n.target))
            calls[key] = calls.get(key, 0) + 1
    seen: dict[str, list[torch.Tensor]] = {}
    for n in out.all_input_nodes:
        if (n.op == "call_module" and calls[id(prepared.get_submodule(n.target))] == 1
                and hasattr(prepared.get_submodule(n.target), "min_val")):
            seen[n.target] = []
            prepared.get_submodule(n.target).register_forward_hook(
                lambda _m, args, _out, name=n.target: seen[name].append(args[0].detach()))
    return seen


def _row_error(obs, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """Mean per-row relative squared error of ``x`` quantized over [lo, hi] with the observer's own scheme."""
    obs.min_val, obs.max_val = lo, hi
    scale, zero = obs.calculate_qparams()
    q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), obs.quant_min, obs.quant_max)
    return float((((q - x) ** 2).sum(1) / (x ** 2).sum(1).clamp_min(1e-12)).mean())


@torch.no_grad()
def fit_output_ranges(prepared: nn.Module, seen: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The int8 range of each quantized graph output, chosen for the rows rather than for the extremes: the
    observer's min-max range shrunk by the fraction (of :data:`OUTPUT_RANGE_FRACTIONS`) with the least mean
    per-row relative error over the calibration rows. Min-max serves the rare row with huge logits and leaves
    the usual row's in a step or two (a briefly trained MobileNetV3: logits to +-1500 on a few rows, median 10);
    where no row is like that the full range wins and nothing changes. Returns the fraction chosen per output."""
    chosen = {}
    for name, chunks in seen.items():
        obs = prepared.get_submodule(name)
        if not chunks or not torch.isfinite(obs.min_val) or not torch.isfinite(obs.max_val):
            continue
        if chunks[0].dim() == 0 or len({c.shape[1:] for c in chunks}) > 1:
            continue  # not rows of one shape (a scalar, or a first axis that is not the batch): left as observed
        x = torch.cat(chunks).reshape(sum(len(c) for c in chunks), -1)
        lo, hi = obs.min_val.clone(), obs.max_val.clone()
        best = min(OUTPUT_RANGE_FRACTIONS, key=lambda f, obs=obs, x=x, lo=lo, hi=hi: _row_error(obs, x, lo * f, hi * f))
        obs.min_val, obs.max_val = lo * best, hi * best
        chosen[name] = best
    return chosen


# The input interval outside which an activation is constant (hardsigmoid: 0 below -3, 1 above 3) or the
# identity (hardswish: 0 below -3): int8 steps spent beyond it buy nothing.
ACTIVATION_DOMAINS = {"hardsigmoid.default": (-3.0, 3.0), "hardsigmoid_.default": (-3.0, 3.0),
                      "hardswish.default": (-3.0, None), "hardswish_.default": (-3.0, None)}


@torch.no_grad()
def clip_to_activation_domains(prepared: torch.fx.GraphModule) -> int:
    """The calibrated range of a tensor read only by hardsigmoid (or hardswish) clipped to where that activation
    changes: the activation of the clipped int8 value is the same, and the steps go where they matter. A
    squeeze-excite gate's logits (MobileNetV3's ``fc2`` before hardsigmoid) reach +-20 after calibration, so a
    min-max range spent 85% of its steps on saturated values; those layers had the worst int8 error of a
    briefly trained torchvision MobileNetV3 (15 dB). Returns how many observers were clipped."""
    clipped = 0
    for n in prepared.graph.nodes:
        if n.op != "call_module" or not n.users:
            continue
        obs = prepared.get_submodule(n.target)
        domains = {ACTIVATION_DOMAINS.get(_op(u)) for u in n.users}
        if len(domains) != 1 or None in domains or not hasattr(obs, "min_val") or obs.min_val.numel() != 1:
            continue
        lo, hi = domains.pop()
        if not torch.isfinite(obs.min_val) or not torch.isfinite(obs.max_val):
            continue
        histogram = hasattr(obs, "histogram")  # its range is searched over the histogram: clip what it finds
        found = [float(v) for v in (obs._non_linear_param_search() if histogram else (obs.min_val, obs.max_val))]
        kept = [max(found[0], lo), found[1] if hi is None else min(found[1], hi)]
        if kept == found or kept[0] >= kept[1]:
            continue
        if histogram:
            obs.calculate_qparams = functools.partial(obs._calculate_qparams, *map(torch.tensor, kept))
        else:
            obs.min_val.fill_(kept[0])
            obs.max_val.fill_(kept[1])
        clipped += 1
    return clipped


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    """What a pattern's traced graph depends on: its code, the values its closure captured (flags, the conv
    function), and the example inputs' shapes and dtypes; None where something is not hashable."""
    fn = getattr(pattern, "fn", pattern)  # torchao's WrapperModule around the pattern function
    code = getattr(fn, "__code__", None)
    if code is None:
        return None

    def sig(v):
        return ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v

    try:
        key = (code, tuple(c.cell_contents for c in fn.__closure__ or ()),
               tuple(sig(x) for x in example_inputs), is_cuda, tuple(sorted((k, sig(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):  # an empty cell or an unhashable capture: trace it every time
        return None
    return key


def _cache_pattern_graphs() -> None:
    """torchao traces every conv+BatchNorm QAT pattern variant with a strict torch.export, again on each
    ``prepare_qat_pt2e`` (about 12 s here) and ``convert_pt2e`` of a QAT graph (about 38 s), though the patterns
    never change. The traced graphs are kept, keyed by what they depend on, and each caller gets its own copy."""
    import copy

    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    original = pt2e_utils._get_aten_graph_module_for_pattern
    if getattr(original, "_edge_pipeline_cache", None) is not None:
        return
    cache: dict = {}

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(cache[key])

    cached._edge_pipeline_cache = cache
    pt2e_utils._get_aten_graph_module_for_pattern = cached  # export_utils imports it from here at call time
    qat_utils._get_aten_graph_module_for_pattern = cached  # bound at import


def prepare_qat(model: nn.Module, calibration: tuple[np.ndarray, ...], quantizer) -> tuple[torch.fx.GraphModule, int]:
    """The float model ready for quantization-aware training with this (``is_qat``) quantizer, and the largest
    batch it takes. It comes from the same eval-mode export as post-training int8, so a model's dropout and
    drop-connect (``if self.training`` branches) are not frozen into the graph as random ops; BatchNorm is
    then switched back to training mode, where QAT folds it into the fake-quantized conv weights."""
    from torchao.quantization.pt2e import move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _cache_pattern_graphs()
    gm, batch = export_for_calibration(model, calibration)
    canonicalize(gm, calibration, batch)
    move_exported_model_to_train(gm)
    return prepare_qat_pt2e(gm, quantizer), batch


BATCH_NORM_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default")


def freeze_batch_norm(prepared: torch.fx.GraphModule) -> None:
    """BatchNorm keeps normalizing with batch statistics no more and stops updating its running ones (the
    ``training`` argument of each op): the late-QAT schedule, so the folded weights the fake quantizers see settle."""
    for n in prepared.graph.nodes:
        if n.op == "call_function" and str(n.target) in BATCH_NORM_OPS and len(n.args) > 5 and n.args[5]:
            args = list(n.args)
            args[5] = False
            n.args = tuple(args)
    prepared.recompile()


def convert_qat(model: nn.Module, calibration: tuple[np.ndarray, ...], quantizer, state: dict,
                fold_quantize: bool = True) -> torch.fx.GraphModule:
    """The int8 model a QAT run learned: the same prepared graph rebuilt, its trained state (weights, BatchNorm
    statistics, fake-quantizer ranges) loaded, then converted like a post-training one."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared, _ = prepare_qat(model, calibration, quantizer)
    missing, unexpected = prepared.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(f"the QAT state does not fit this model and quantizer ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected entries, e.g. {(missing or unexpected)[0]})",
                            hint="run the qat stage again (edge-pipeline run --from-stage qat)")
    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared, fold_quantize=fold_quantize)
    for m in converted.modules():  # the graph is in eval form now; say so to exporters that check the flag
        m.training = False
    return converted


def qat_outputs(model: nn.Module, calibration: tuple[np.ndarray, ...], quantizer, state: dict,
                split) -> list[np.ndarray]:
    """The QAT run's int8 graph, converted, run in PyTorch over a split: what its lowered artifact must reproduce."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    from edge_pipeline.evaluation import predict

    _, batch = export_for_calibration(model, calibration)  # the memoized export: the batch it takes
    gm = convert_qat(model, calibration, quantizer, state)
    allow_exported_model_train_eval(gm)  # predict switches modes; on a converted graph that changes nothing
    return predict(gm, split, batch_size=batch)


def weights_per_tensor(gm, layers, weight_qspec) -> int:
    """The Conv/Linear ops of these modules take ``weight_qspec`` (one scale per tensor) for their weight, in
    place of the global per-channel spec. (A module-name config cannot do it: the quantizers' filters also test
    the weight's own node, which carries no module path in an exported graph, so the layer went unquantized.)"""
    wanted = {flat_name(name) for name in layers}
    changed = 0
    for n in gm.graph.nodes:
        a = n.meta.get("quantization_annotation")
        if n.op != "call_function" or not str(n.target).startswith(LAYER_OPS) or a is None \
                or module_path(n) not in wanted or len(n.args) < 2 or n.args[1] not in a.input_qspec_map:
            continue
        a.input_qspec_map[n.args[1]] = weight_qspec
        changed += 1
    return changed


def keep_float(quantizer, layers) -> None:
    """Keep these modules in float: the accuracy-aware fallback.

    Both quantizers (XNNPACK's and litert-torch's) annotate a module named in ``module_name_config`` with its
    own config, skip it when that config is None, and leave it out of the global config. Their
    ``set_module_name(name, None)`` still asserts "None is not supported yet" in these versions, so the
    entry is set directly.
    """
    for name in layers:
        quantizer.module_name_config[flat_name(name)] = None


def canonicalize(gm: torch.fx.GraphModule, calibration: tuple[np.ndarray, ...], batch: int) -> None:
    """The float graph as the quantizers should see it: clamps in their fusable form, and every tensor that
    carries a masking sentinel on the first calibration rows marked (:func:`mark_sentinels`)."""
    canonicalize_clamps(gm)
    fold_symmetric_pads(gm)
    rows = min(len(calibration[0]), SENTINEL_ROWS)
    mark_sentinels(gm, [tuple(torch.from_numpy(a[i:i + batch]) for a in calibration) for i in range(0, rows, batch)])


SENTINEL_ROWS = 64  # calibration rows searched for masking sentinels (a mask shows only where a row is padded)


@torch.no_grad()
def mark_sentinels(gm: torch.fx.GraphModule, batches) -> int:
    """Marks (``meta["sentinel"]``) each op or input whose float output holds +-inf or a value >= :data:`SENTINEL`
    in magnitude on any of these input batches: an attention mask, and the scores it is added to (weights are not
    looked at). The quantizer wrapper leaves them float. Returns how many."""
    marked: set[str] = set()

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if (n.op != "get_attr"  # weights are the quantizers' own business: large ones are not masks
                    and isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel()
                    and not bool((out.abs() < SENTINEL).all())):
                n.meta["sentinel"] = True
                marked.add(n.name)
            return out

    for inputs in batches:
        Recorder(gm).run(*inputs)
    return len(marked)


def canonicalize_clamps(gm: torch.fx.GraphModule) -> None:
    """``clamp(x, 0, 6)`` and ``relu6`` (how models write ReLU6) become ``hardtanh(x, 0, 6)``, and ``clamp(x,
    min=0)`` becomes ``relu``: the same function, in the form quantizers and XNNPACK fuse into the op before it."""
    aten = torch.ops.aten
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.relu6.default, aten.relu6_.default):
            n.target, n.args, n.kwargs = aten.hardtanh.default, (n.args[0], 0.0, 6.0), {}
            continue
        if n.op != "call_function" or n.target not in (aten.clamp.default, aten.clamp_.default):
            continue
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)) or lo is None:
            continue
        if hi is None and lo == 0:
            n.target, n.args, n.kwargs = aten.relu.default, (n.args[0],), {}
        elif hi is not None:
            n.target, n.args, n.kwargs = aten.hardtanh.default, (n.args[0], float(lo), float(hi)), {}
    gm.recompile()


def fold_symmetric_pads(gm: torch.fx.GraphModule) -> int:
    """A zero pad by the same amount on both sides of each spatial dim, read only by a convolution, becomes that
    convolution's own padding (the same function, one op fewer), as TF-ported models' "same" padding is at stride
    1. Where the convolution is the float fallback's in an int8 graph, the pad otherwise ran as a float pad between
    two converts (0.19 ms of EfficientNet-Lite0's 5.3 ms on ExecuTorch with its first depthwise conv in float);
    XNNPACK cannot take it into that conv, as it does in fp32 graphs (its int8 pad pass then makes the float conv's
    input int8). Asymmetric pads (before strided convs) are left to the annotation (``leave_pads_to_their_convs``)."""
    folded = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or _op(n) not in PAD_OPS or not _zero_pad(n) or len(n.users) != 1:
            continue
        conv = next(iter(n.users))
        dims = {"conv1d.default": 1, "conv2d.default": 2}.get(_op(conv))
        amounts = list(n.args[1])
        # torch.export writes a convolution's arguments positionally: (x, weight, bias, stride, padding, ...)
        if dims is None or conv.kwargs or conv.args[0] is not n or len(amounts) > 2 * dims:
            continue
        amounts += [0] * (2 * dims - len(amounts))
        padding = conv.args[4] if len(conv.args) > 4 else [0] * dims
        if isinstance(padding, str) or any(amounts[i] != amounts[i + 1] for i in range(0, 2 * dims, 2)):
            continue
        padding = list(padding) * (dims if len(padding) == 1 else 1)
        # F.pad's amounts run from the last dim backwards; a convolution's padding from the first spatial dim
        grown = [p + amounts[2 * (dims - 1 - d)] for d, p in enumerate(padding)]
        args = list(conv.args) + [None, [1] * dims, [0] * dims][len(conv.args) - 2:]  # defaults up to padding
        args[0], args[4] = n.args[0], grown
        conv.args = tuple(args)
        gm.graph.erase_node(n)
        folded += 1
    if folded:
        gm.recompile()
    return folded


class FusedActivations:
    """A PT2E quantizer that also fuses bounded activations into the op before them.

    XNNPACKQuantizer fuses conv/linear/add with ReLU, but not with hardtanh (ReLU6): it quantizes the conv's
    pre-activation output, whose range after BatchNorm folding is wide, and only then clamps, so MobileNet-
    and EfficientNet-Lite-style models lose most of their int8 resolution. Here the producer's output stays
    float and the activation's output carries its quantization spec, as the conv+ReLU pattern does (XNNPACK then
    fuses the clamp into the int8 op as its output range). Integer tensors lose any annotation the inner
    quantizer gave them, and so do masking sentinels (:func:`drop_unquantizable_annotations`).

    ``output_layers``: the config for the Conv/Linear layers that make the model's outputs (through reshapes
    only), or None to keep them float. A static int8 output takes one range over every row's logits: on a
    briefly trained MobileNetV3 a few calibration rows reach +-1500 while the median is 10, so its int8 step
    (12) is wider than the usual top-1 margin, and top-1 agreement fell to 83% from 94% with the head float.
    A dynamically quantized head (int8 weights, each row's own input scale, float out) keeps the int8 size.
    """

    ACTIVATIONS = ("relu.default", "relu_.default", "hardtanh.default", "hardtanh_.default")
    # batch_norm: a QAT graph keeps conv -> BatchNorm -> activation until prepare folds them (post-training
    # graphs have BatchNorm folded before annotation)
    PRODUCERS = ("conv1d.default", "conv2d.default", "linear.default", "add.Tensor", "add_.Tensor",
                 "batch_norm.default")

    def __init__(self, inner, output_layers=None, keep_outputs: bool = True, pads_into_convs: bool = False,
                 per_tensor_layers=(), per_tensor_weight=None):
        self.inner = inner
        self.per_tensor = (per_tensor_layers, per_tensor_weight)  # see weights_per_tensor
        self.pads_into_convs = pads_into_convs  # XNNPACK: see leave_pads_to_their_convs
        self.output_layers = output_layers
        self.keep_outputs = keep_outputs  # False: outputs quantized like any tensor (QAT learns their range)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def transform_for_annotation(self, gm):
        integer = {n.name: n.meta["val"].dtype for n in gm.graph.nodes if _integer(n)}
        gm = self.inner.transform_for_annotation(gm)
        _keep_integer_constants(gm, integer)
        return gm

    def annotate(self, gm):
        if self.keep_outputs:
            for layer in output_layers(gm):
                self.inner.module_name_config.setdefault(layer, self.output_layers)
        gm = self.inner.annotate(gm)
        config = getattr(self.inner, "global_config", None)
        if getattr(config, "output_activation", None) is not None:
            annotate_between_quantized(gm, config.output_activation)
        drop_unquantizable_annotations(gm)
        if self.per_tensor[0]:
            weights_per_tensor(gm, *self.per_tensor)
        fuse_activation_annotations(gm, self.ACTIVATIONS, self.PRODUCERS)
        if self.pads_into_convs:
            leave_pads_to_their_convs(gm)
        share_quantization_through_pads(gm)
        own_range_for_global_pools(gm)
        return gm

    def validate(self, gm) -> None:
        self.inner.validate(gm)


PAD_OPS = ("constant_pad_nd.default", "pad.default")


def _zero_pad(n) -> bool:
    """A constant zero padding that only grows the tensor (``aten.pad``'s mode is its third argument)."""
    if _op(n) == "pad.default":
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value")
    else:
        mode, value = "constant", n.args[2] if len(n.args) > 2 else n.kwargs.get("value", 0.0)
    return mode == "constant" and value in (0, 0.0, None) and all(p >= 0 for p in n.args[1])


def leave_pads_to_their_convs(gm) -> int:
    """A zero pad whose one user is a convolution is left out of the int8 annotation on both sides, so that the
    graph reads dequantize -> pad -> conv: XNNPACK's partitioner takes that pad with its convolution (ExecuTorch
    inserts the pad's own quantize/dequantize and serializes an int8 "Constant Pad (ND, X8)"). Annotated like any
    tensor, the pad sat between a dequantize and a quantize and ran in float ("Constant Pad (ND, X32)" with a
    "Convert (NC)" each side): on EfficientNet-Lite0 int8 a third of the op time."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    left = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or _op(n) not in PAD_OPS or not _zero_pad(n) or len(n.users) != 1:
            continue
        conv = next(iter(n.users))
        annotation = conv.meta.get("quantization_annotation")
        src = getattr(n.args[0], "meta", {}).get("quantization_annotation")
        if _op(conv) not in ("conv1d.default", "conv2d.default") or annotation is None \
                or n not in annotation.input_qspec_map or src is None or src.output_qspec is None:
            continue  # the pad must read an int8 tensor: a pad on the float model input stays as it was
        del annotation.input_qspec_map[n]
        n.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)  # nothing to quantize here
        left += 1
    return left


def share_quantization_through_pads(gm) -> int:
    """Zero-padding of an int8 tensor stays int8 with the input's scale and zero point (0.0 is exactly its zero
    point): XNNPACK then runs "Constant Pad (ND, X8)". Left unannotated, the pad before each strided depthwise
    convolution ("same" padding, as TF-ported models do) ran in float between a dequantize and a quantize: a
    third of EfficientNet-Lite0's int8 op time went to those pads and converts."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    shared = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or _op(n) not in PAD_OPS or "quantization_annotation" in n.meta:
            continue
        src = n.args[0]
        annotated = getattr(src, "meta", {}).get("quantization_annotation")
        if not _zero_pad(n) or annotated is None or annotated.output_qspec is None:
            continue  # a non-zero fill, or a float input: nothing to share
        n.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={src: SharedQuantizationSpec(src)}, output_qspec=SharedQuantizationSpec((src, n)),
            _annotated=True)
        shared += 1
    return shared


def own_range_for_global_pools(gm) -> int:
    """A global average pool (a squeeze-excite block's squeeze) gets its own int8 range instead of sharing its
    input's: the mean over a feature map spans a small part of the map's range, so with the map's scale a
    squeeze-excite gate's input kept a few int8 steps (torchvision's MobileNetV3 uses
    ``adaptive_avg_pool2d``, which the quantizers annotate as shared; timm's ``mean`` was left float).
    The runtimes' int8 global pooling takes separate input and output scales."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    changed = 0
    for n in gm.graph.nodes:
        a = n.meta.get("quantization_annotation")
        if n.op != "call_function" or _op(n) != "adaptive_avg_pool2d.default" or a is None \
                or not isinstance(a.output_qspec, SharedQuantizationSpec) or tuple(n.args[1]) not in ((1, 1), (1,)):
            continue
        own = next((q for q in a.input_qspec_map.values() if not isinstance(q, SharedQuantizationSpec)), None)
        if own is None:
            src = n.args[0].meta.get("quantization_annotation")
            own = getattr(src, "output_qspec", None)
        if own is None or isinstance(own, SharedQuantizationSpec):
            continue
        a.output_qspec = own
        changed += 1
    return changed


# Ops whose int8 kernels take any input and output scales, and how many tensor inputs each reads.
INT8_ELEMENTWISE = {"add.Tensor": 2, "add_.Tensor": 2, "mul.Tensor": 2, "relu.default": 1, "relu_.default": 1,
                    "hardtanh.default": 1, "hardtanh_.default": 1}


def annotate_between_quantized(gm, spec) -> int:
    """An add, multiply or ReLU of quantized tensors that the quantizer left unannotated gets ``spec`` on its
    inputs and output.

    litert-torch's annotators find these ops by their source function, which torch.export no longer records, so
    they annotate none: such an op still became int8 through its neighbours' quantize/dequantize pairs, but where
    it reads another unannotated op (residual adds in a row) the converter ran both in float between DEQUANTIZE
    and QUANTIZE ops (EfficientNet-Lite0: 4 of its 9 adds). Its conv annotator also fuses a ReLU into a
    convolution whose raw output another op reads: that output gets ``spec`` too. Nodes are visited in graph
    order, so a chain is annotated from its first op. Returns how many annotations were added."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    key, quantized, added = "quantization_annotation", set(), 0
    for n in gm.graph.nodes:
        a = n.meta.get(key)
        if a is not None and a.output_qspec is None and len(n.users) > 1 and _float_tensor(n) \
                and any(_fused_into(u, n) for u in n.users):
            a.output_qspec = spec  # a conv fused with its ReLU whose raw output is read elsewhere too
            added += 1
        if a is not None:
            if a.output_qspec is not None:
                quantized.add(n)
            continue
        if n.op != "call_function" or _op(n) not in INT8_ELEMENTWISE or not _float_tensor(n):
            continue
        ins = [x for x in n.args[:INT8_ELEMENTWISE[_op(n)]] if isinstance(x, torch.fx.Node)]
        if len(ins) == INT8_ELEMENTWISE[_op(n)] and all(x in quantized and _float_tensor(x) for x in ins):
            n.meta[key] = QuantizationAnnotation(input_qspec_map=dict.fromkeys(ins, spec), output_qspec=spec,
                                                 _annotated=True)
            quantized.add(n)
            added += 1
    return added


def _fused_into(user, producer) -> bool:
    """``user`` is an activation annotated as fused with ``producer``: its output quantized, its input not."""
    a = user.meta.get("quantization_annotation")
    return (user.op == "call_function" and _op(user) in FusedActivations.ACTIVATIONS
            and a is not None and a.output_qspec is not None and producer not in a.input_qspec_map)


def _float_tensor(node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


SHAPE_OPS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "clone", "contiguous",
             "_unsafe_view")


def output_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the Conv/Linear layers whose outputs are the graph's outputs (through reshapes only)."""
    found = []
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for n in out.all_input_nodes:
        while n.op == "call_function" and _op(n).split(".")[0] in SHAPE_OPS and n.all_input_nodes:
            n = n.all_input_nodes[0]
        if n.op == "call_function" and str(n.target).startswith(LAYER_OPS) and module_path(n):
            found.append(module_path(n))
    return found


# Ops that multiply two activations: attention's query-key scores and its weighted sum of the values.
ACTIVATION_PRODUCTS = ("matmul", "bmm", "baddbmm", "mm", "einsum", "scaled_dot_product_attention")


def activation_product_modules(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """The modules around ops that multiply two activations (attention blocks), as layer names: the innermost
    module of each such op. A product with a weight (a Linear exported as ``t`` then ``mm``) is not one."""
    ep = torch.export.export(model, example)
    sig = ep.graph_signature
    constant = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    found: dict[str, None] = {}
    for node in ep.graph.nodes:
        inputs = node.all_input_nodes
        if node.op != "call_function" or not inputs:
            continue
        if all(a.name in constant for a in inputs):
            constant.add(node.name)  # computed from weights alone
        elif (str(node.target).split(".") + [""])[1] in ACTIVATION_PRODUCTS and \
                sum(a.name not in constant for a in inputs) >= 2 and module_path(node):
            found[module_path(node)] = None
    return [p.removeprefix(flat_name("") + ".") for p in found if p != flat_name("")]


def module_path(node) -> str | None:
    """The path of the module an exported graph's node came from (the innermost on its stack), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _op(n) -> str:
    return str(n.target).removeprefix("aten.")


def _integer(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and not val.is_floating_point()


def _keep_integer_constants(gm, integer: dict) -> None:
    """The quantizers' annotation pass turns scalar operands of add/mul into tensor constants of the scalar's own
    type. On an int64 op (``arange + 1`` in a transformer's mask positions) XNNPACK's float32 constant made the
    result float, which ``index`` then refused: such a constant takes its op's integer dtype back. On a float op
    litert-torch's int64 constant (``1 + 999 * x``) was annotated for int8 and its quantize refused the int64
    input: such a constant becomes float32."""
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        for a in n.args:
            if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                owner, _, leaf = a.target.rpartition(".")
                mod = gm.get_submodule(owner) if owner else gm
                t = getattr(mod, leaf)
                if not isinstance(t, torch.Tensor):
                    continue
                if n.name in integer and t.is_floating_point() and bool((t == t.round()).all()):
                    setattr(mod, leaf, t.to(integer[n.name]))
                elif val.is_floating_point() and not t.is_floating_point() and t.dim() == 0:
                    setattr(mod, leaf, t.to(torch.float32))


def drop_unquantizable_annotations(gm) -> int:
    """Integer tensors and tensors holding masking sentinels are never quantized. The quantizers annotate
    ``add``/``mul`` by op alone, so index arithmetic on int64 (a transformer's attention-mask positions) got
    observers that turn it into float, and ``index`` then failed ("tensors used as indices must be long"); and
    an attention mask's ``finfo.min`` stretched its add's int8 range over every real score. Returns how many
    annotations were dropped."""
    key, dropped = "quantization_annotation", 0

    def integer(node) -> bool:
        return isinstance(node, torch.fx.Node) and (node.meta.get("sentinel", False) or _integer(node))

    for n in gm.graph.nodes:
        a = n.meta.get(key)
        if a is None:
            continue
        if a.output_qspec is not None and integer(n):
            a.output_qspec = None
            dropped += 1
        for inp in [i for i in a.input_qspec_map if integer(i)]:
            del a.input_qspec_map[inp]
            dropped += 1
    return dropped


def fuse_activation_annotations(gm, activations, producers) -> int:
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    key = "quantization_annotation"
    fused = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or _op(n) not in activations or not n.args:
            continue
        p = n.args[0]
        if not isinstance(p, torch.fx.Node) or _op(p) not in producers or len(p.users) != 1:
            continue
        pa = p.meta.get(key)
        if pa is None or pa.output_qspec is None or getattr(pa.output_qspec, "edge_or_node", None) is not None:
            continue  # not quantized (kept float), or its output shares another tensor's scale
        n.meta[key] = QuantizationAnnotation(input_qspec_map={}, output_qspec=pa.output_qspec, _annotated=True)
        pa.output_qspec = None
        fused += 1
    return fused


LAYER_OPS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear")


@torch.no_grad()
def layer_errors(model: nn.Module, calibration: tuple[np.ndarray, ...], rows: tuple[np.ndarray, ...],
                 quantizer) -> dict[str, float]:
    """Own int8 error (dB) per Conv/Linear layer of one calibrated PT2E build, from torchao's numeric debugger:
    the float graph and the quantized one come from the same export (the debugger matches their nodes by that
    graph's id), each op's output is logged over ``rows`` and compared; ``layer_error.blame`` turns the
    cumulative SQNR into each layer's own share."""
    from torchao.quantization.pt2e import (
        compare_results,
        extract_results_from_loggers,
        prepare_for_propagation_comparison,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    from edge_pipeline.layer_error import blame

    gm, batch = export_for_calibration(model, calibration)
    canonicalize(gm, calibration, batch)
    # prepare_pt2e folds BatchNorm into the convs: fold the float copy alike, else each float conv's output
    # (before its BatchNorm) would be compared with a quantized conv's output (after it).
    _fuse_conv_bn_(gm)
    float_logged = prepare_for_propagation_comparison(gm)  # a copy: prepare_pt2e below changes gm
    # A tensor read only by a clipped activation (clip_to_activation_domains) is judged after that activation:
    # its clipped int8 value differs from the float one by design, the activation's output does not.
    clipped = {n.name for n in gm.graph.nodes if n.users and all(_op(u) in ACTIVATION_DOMAINS for u in n.users)}
    prepared = prepare_pt2e(gm, quantizer)
    for i in range(0, len(calibration[0]), batch):
        prepared(*[torch.from_numpy(a[i:i + batch]) for a in calibration])
    clip_to_activation_domains(prepared)
    quant_logged = prepare_for_propagation_comparison(convert_pt2e(prepared))
    for i in range(0, len(rows[0]), batch):
        chunk = [torch.from_numpy(a[i:i + batch]) for a in rows]
        float_logged(*chunk)
        quant_logged(*chunk)
    logged = [{info: r for info, r in extract_results_from_loggers(m).items()
               if all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in r[2])}
              for m in (float_logged, quant_logged)]  # tensors only: a dynamic batch logs its sizes (ints) too
    compared = compare_results(*logged)
    sqnr = {}
    for info, summary in compared.items():
        if info.name in clipped:
            continue
        noise = [10 ** (-float(r.sqnr) / 10) for r in summary.results if torch.isfinite(r.sqnr)]
        sqnr[info.name] = float("inf") if not noise else -10 * float(np.log10(max(np.mean(noise), 1e-30)))
    ops, alias = [], {}
    for node in float_logged.graph.nodes:
        if node.op == "call_module":  # the debugger's loggers sit between an op and its users
            alias[node.name] = node.args[0].name
            continue
        if node.op != "call_function":
            continue
        layer = None
        if str(node.target).startswith(LAYER_OPS) and module_path(node):
            layer = module_path(node).removeprefix("model.")  # paths inside FlatModel
        source = next((alias.get(a.name, a.name) for a in node.args if isinstance(a, torch.fx.Node)), None)
        ops.append((node.name, layer, source))
    return blame(ops, sqnr)

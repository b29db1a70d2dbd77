"""What ExecuTorch and TFLite share: PT2E static int8 with a calibration method chosen per profile."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import flat_name
from edge_pipeline.targets import Profile

PT2E_METHODS = ("minmax", "moving_average", "histogram")


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


def export_for_calibration(model: nn.Module, calibration: tuple[np.ndarray, ...]) -> tuple[torch.fx.GraphModule, int]:
    """One ``torch.export`` of the float model with a dynamic batch, so the representative set runs in batches
    (a batch-1 export rejects them); a model that will not export with a dynamic batch is calibrated row by
    row. Returns the graph module and the batch size it takes."""
    n = min(16, len(calibration[0]))
    if n >= 2:
        example = tuple(torch.from_numpy(a[:n]) for a in calibration)
        batch = torch.export.Dim("batch", min=1, max=max(CALIBRATION_BATCH, n))
        try:
            ep = torch.export.export(model.eval(), example, dynamic_shapes=tuple({0: batch} for _ in example))
            return ep.module(), CALIBRATION_BATCH
        except Exception:  # noqa: BLE001 - shape-specialized models: fall back to batch 1
            pass
    example = tuple(torch.from_numpy(a[:1]) for a in calibration)
    return torch.export.export(model.eval(), example).module(), 1


def quantize(model: nn.Module, calibration: tuple[np.ndarray, ...], quantizer,
             fold_quantize: bool = True) -> torch.fx.GraphModule:
    """torch.export -> prepare_pt2e -> run the representative set (batched where it can) -> convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm, batch = export_for_calibration(model, calibration)
    gm = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration[0]), batch):
            gm(*[torch.from_numpy(a[i:i + batch]) for a in calibration])
    return convert_pt2e(gm, fold_quantize=fold_quantize)


def keep_float(quantizer, layers) -> None:
    """Keep these modules in float: the accuracy-aware fallback.

    Both quantizers (XNNPACK's and litert-torch's) annotate a module named in ``module_name_config`` with its
    own config, skip it when that config is None, and leave it out of the global config. Their
    ``set_module_name(name, None)`` still asserts "None is not supported yet" in these versions, so the
    entry is set directly.
    """
    for name in layers:
        quantizer.module_name_config[flat_name(name)] = None

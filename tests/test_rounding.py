"""Weight rounding chosen on the data: each layer's output error on the representative set goes down, and the
runtimes' own quantizers read back exactly the integers chosen."""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_pipeline.backends import tflite
from edge_pipeline.interface import FlatModel, discover
from edge_pipeline.rounding import QMAX, rounded_weights, with_weights
from edge_pipeline.targets import load_profile


class SmallNet(nn.Module):
    """Stem conv, a depthwise conv, a pointwise conv and a Linear head: the layer kinds rounding handles."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.pw(F.relu(self.dw(F.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Photos' statistics in small: coarse noise upsampled, so neighbouring pixels agree (what makes a
    depthwise kernel's rounding errors add up)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.standard_normal((n, 3, 4, 4)).astype(np.float32))
    return F.interpolate(coarse, size=16, mode="bilinear", align_corners=False).numpy()


def _layer_error(model, name, weight, x) -> float:
    """Squared error of one layer's output on its inputs in ``model`` with ``weight`` in place of its own."""
    layer = dict(model.named_modules())[name]
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    inp = seen[0]
    f = F.linear if isinstance(layer, nn.Linear) else (
        lambda t, w: F.conv2d(t, w, None, layer.stride, layer.padding, layer.dilation, layer.groups))
    with torch.no_grad():
        return float(((f(inp, weight) - f(inp, layer.weight)) ** 2).sum())


def _nearest(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1, keepdim=True) / QMAX
    return (torch.round(flat / scale) * scale).reshape(w.shape)


def test_rounding_on_the_data_lowers_each_layers_output_error_and_keeps_the_int8_grid():
    model = SmallNet().eval()
    calibration = smooth_images(64, 0)
    rounded = rounded_weights(model, (calibration,))
    assert set(rounded) == {"stem", "dw", "pw", "head"}
    held_out = smooth_images(64, 1)
    for name, weight in rounded.items():
        original = dict(model.named_modules())[name].weight.detach()
        flat, scale = weight.reshape(len(weight), -1), original.reshape(len(original), -1).abs().amax(1) / QMAX
        q = flat / scale[:, None]
        assert torch.allclose(q, q.round(), atol=1e-3), f"{name}: off the int8 grid"
        assert torch.equal(q.round().abs().amax(1), torch.full_like(scale, QMAX)), f"{name}: scale not kept"
        assert (q.round() - original.reshape(len(original), -1) / scale[:, None]).abs().max() < 1, \
            f"{name}: each weight rounds up or down, no further"
        assert _layer_error(model, name, weight, held_out) < _layer_error(model, name, _nearest(original),
                                                                             held_out), name


def test_litert_int8_file_holds_the_integers_chosen(tmp_path):
    """litert-torch's quantizer reads the rounded weights back as exactly the chosen integers (its scale is
    max |w| / 127, the channel's largest weight stays at +-127)."""
    model = SmallNet().eval()
    calibration = smooth_images(64, 0)
    rounded = rounded_weights(model, (calibration,))
    copy = FlatModel(with_weights(model, rounded))
    example = (torch.from_numpy(calibration[:1]),)
    path = tflite.export(copy, example, (calibration,), load_profile("tflite-int8"), tmp_path,
                         discover(copy.model, (calibration[:1],)), fixtures=False)
    stored = {v.shape: v for v, _axis in tflite.weights(path).values()}
    for name, weight in rounded.items():
        scale = weight.reshape(len(weight), -1).abs().amax(1) / QMAX
        q = torch.round(weight.reshape(len(weight), -1) / scale[:, None]).reshape(weight.shape)
        if name == "dw":  # LiteRT's depthwise layout: (1, kh, kw, C)
            q = q.permute(1, 2, 3, 0)
        elif q.dim() == 4:  # conv: (O, kh, kw, I)
            q = q.permute(0, 2, 3, 1)
        assert tuple(q.shape) in stored, (name, q.shape, list(stored))
        assert np.array_equal(stored[tuple(q.shape)].astype(np.int64), q.numpy().astype(np.int64)), name

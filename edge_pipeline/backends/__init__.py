"""The backend contract and its registry: one module per runtime in this package, found by scanning it.

A module is a backend when it declares ``BACKEND = Backend(...)`` (what it is and what it can do) and provides:

- ``export(model, example, calibration, profile, out_dir, iface, float_layers=(), default_flow=False,
  fixtures=True, qat=None) -> Path`` (and ``activations="static"`` where ``dynamic_activations``): writes the
  artifact (and the files its runtime module lists as ``SIDECARS``) and ``describe.json``; with ``fixtures`` also
  the device tool's golden-I/O files.
- ``describe(path) -> dict``: what an integrator needs (I/O, int8 scale/zero point, operators).
- ``weights(path)`` where the artifact's weights can be read back (``Backend.weights``);
- ``int8_weight_grid(profile, activations="static")`` (optional): the grid its int8 build (static or per-inference
  activations) puts each layer's symmetric per-channel weights on (``(name, module) -> qmax or None``, scale
  max |w| / qmax; None for a layer left float; or None for no layer): the lower stage
  rounds those on the data (``rounding``);
- ``qat_quantizer(profile)`` where ``qat``; ``layer_errors(model, example, calibration, rows, profile, iface)
  -> {layer: dB}`` where ``layer_errors``.

The device side is ``edge_pipeline/harness/runtime_<name>.py`` (numpy and the runtime only), found by the
runner through the artifact's suffix. Everything else (targets, lower, qat, bench, doctor, the cache key, the
adb device) asks this registry; a target whose backend lacks a capability is refused with its name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class DeviceTool:
    """A runtime's own benchmark binary, run on a phone over adb instead of the Python runner."""
    name: str  # the binary's name, and the adb device option that gives its path (``?NAME=PATH``)
    files: Callable[[Path], list[Path]]  # what to push from the lowered target's folder
    argv: Callable[[str, Path, int, int, int], list[str]]  # (tool path, target folder, threads, runs, warmup)
    parse: Callable[[str], dict]  # its printed output -> the runner's result schema
    writes_outputs: bool = False  # output-<i>.bin files to pull and compare (ExecuTorch's executor_runner)
    profile_flags: tuple[str, ...] = ()  # what makes it print a per-operator profile
    parse_profile: Callable[[str], list[dict]] | None = None  # that profile -> rows (name, kind, ms, overhead)


@dataclass(frozen=True)
class Backend:
    name: str  # a profile's ``backend:``
    description: str
    suffix: str  # the artifact's file type
    packages: tuple[str, ...]  # the distributions it needs on this machine (doctor, the stage cache key)
    targets: tuple[str, str]  # its built-in int8 and fp32 profiles (init's default targets, bench)
    precisions: tuple[str, ...] = ("fp32", "int8")
    float_layers: bool = True  # keeps named layers in float in an int8 build (the accuracy fallback)
    qat: bool = False  # trains int8 with its own fake quantizers (``qat_quantizer``)
    layer_errors: bool = False  # per-layer int8 error from the runtime's debugger (``layer_errors``)
    # int8 weights with activations quantized per inference (``export(..., activations="dynamic")``): the
    # accuracy fallback where one static range per tensor cannot serve every row
    dynamic_activations: bool = False
    calibration_methods: tuple[str, ...] = ("minmax",)
    platforms: tuple[str, ...] = ()  # the profile ``platform`` values it builds for ((): not platform-specific)
    device_tool: DeviceTool | None = None
    # The layers' weight tensors read back from an artifact: path -> {tensor name: (values, the axis of its
    # per-channel quantization or None)}. None where the format does not expose them.
    weights: Callable[[Path], dict[str, tuple]] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # capability -> why it is missing, for refusals

    def refusal(self, capability: str) -> str:
        why = self.notes.get(capability)
        return f"backend {self.name} has no {capability}" + (f": {why}" if why else "")


# Why an int8 build quantizes its activations per inference: the fallback chose it on val (lower stage).
DYNAMIC_REASON = ("activations quantized per inference (a scale per row computed at run time; int8 weights): one "
                  "static range per tensor did not serve every row")


def activations_entry(profile, activations: str) -> dict:
    """describe.json's word on an int8 build's activations: static (calibrated ranges) or dynamic, and why."""
    if profile.precision != "int8":
        return {}
    if activations == "dynamic":
        return {"activations": "dynamic", "activations_reason": DYNAMIC_REASON}
    return {"activations": "static"}


_EXTRA: dict[str, ModuleType] = {}  # registered at run time (a plugin, a test)


@cache
def _scanned() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(mod, "BACKEND", None)
        if isinstance(spec, Backend):
            found[spec.name] = mod
    return found


def backends() -> dict[str, ModuleType]:
    """{name: module}, sorted by name."""
    return dict(sorted({**_scanned(), **_EXTRA}.items()))


def register(module: ModuleType) -> None:
    """Add a backend module from outside this package (it declares ``BACKEND`` like the built-in ones)."""
    _EXTRA[module.BACKEND.name] = module


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def get_backend(name: str) -> ModuleType:
    try:
        return backends()[name]
    except KeyError:
        from edge_pipeline.errors import PipelineError

        raise PipelineError(f"unknown backend '{name}'", hint=f"known: {', '.join(backends())}") from None


def spec(name: str) -> Backend:
    return get_backend(name).BACKEND


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in artifact_files(path))


def artifact_gzip_bytes(path: Path) -> int:
    """The artifact's files compressed as the release archive compresses them (gzip, level 9): its download."""
    import gzip

    return sum(len(gzip.compress(f.read_bytes(), compresslevel=9, mtime=0)) for f in artifact_files(path))


def artifact_weights(path: Path) -> dict:
    """How many distinct values the layers' weights hold, read back from the artifact file: per tensor, and per
    channel where a tensor is quantized per channel (each channel then has its own scale). A clustered model's
    layers show at most 2^b here."""
    import numpy as np

    backend = next(m.BACKEND for m in backends().values() if m.BACKEND.suffix == Path(path).suffix)
    if backend.weights is None:
        return {"read_back": False, "why": backend.notes.get("weights", "the format does not expose them")}
    tensors = {}
    for name, (values, axis) in backend.weights(path).items():
        entry = {"shape": list(values.shape), "dtype": str(values.dtype), "distinct": int(np.unique(values).size)}
        if axis is not None:
            entry["distinct_per_channel"] = max(int(np.unique(np.take(values, i, axis=axis)).size)
                                                for i in range(values.shape[axis]))
        tensors[name] = entry
    return {"read_back": True, "tensors": tensors}


def artifact_files(path: Path) -> list[Path]:
    """The artifact and the files beside it that belong to it (what a device needs to load it), as the
    harness's runtime module for its suffix declares them: one declaration for host and device."""
    from edge_pipeline.harness import runner

    path = Path(path)
    runtime = runner.runtimes().get(path.suffix)
    return [path, *(path.with_suffix(s) for s in (runtime.SIDECARS if runtime else ()))]

"""Target profiles: one YAML file per deployment target (backend, precision, quantization, budgets).

Profiles are looked up by name in ``./targets/`` (users' own) and then in the project's ``targets/``; a path
to a ``.yaml`` file works too.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_pipeline.errors import PipelineError
from edge_pipeline.resources import shipped

BUILTIN_DIR = shipped("targets")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantConfig(_Strict):
    per_channel: bool = True
    symmetric_activations: bool = False
    method: Literal["minmax", "moving_average", "histogram", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=50, le=100)
    max_float_layers: int = Field(3, ge=0)  # accuracy-aware fallback limit
    # Layers (module paths) whose int8 weights take one scale for the whole tensor even where per_channel is on:
    # a clustered model's layers (lower sets them), whose 2^b distinct weights then stay 2^b int8 values.
    per_tensor_layers: tuple[str, ...] = ()


class ParityTolerance(_Strict):
    min_cosine: float = Field(0.99, ge=-1, le=1)
    min_top1_agreement: float = Field(0.97, ge=0, le=1)
    max_abs: float | None = Field(None, ge=0)


class Budgets(_Strict):
    max_size_bytes: int | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(0.01, ge=0)  # vs the float model it came from, test split
    parity: ParityTolerance = ParityTolerance()

    def violations(self, size_bytes: int | None = None, accuracy_drop: float | None = None,
                   p50_ms: float | None = None) -> list[str]:
        """Each budget these figures miss, as a sentence; a figure given as None is not checked."""
        out = []
        if self.max_size_bytes and size_bytes is not None and size_bytes > self.max_size_bytes:
            out.append(f"size {size_bytes} B > max_size_bytes {self.max_size_bytes}")
        if self.max_latency_ms and p50_ms is not None and p50_ms > self.max_latency_ms:
            out.append(f"p50 latency {p50_ms:.3f} ms > max_latency_ms {self.max_latency_ms}")
        if (self.max_accuracy_drop is not None and accuracy_drop is not None
                and accuracy_drop > self.max_accuracy_drop + 1e-9):
            out.append(f"accuracy drop {accuracy_drop:.4f} > max_accuracy_drop {self.max_accuracy_drop}")
        return out


class Profile(_Strict):
    name: str
    description: str = ""
    backend: str  # a registered backend (edge_pipeline.backends)
    precision: Literal["fp32", "int8"]
    quantization: QuantConfig = QuantConfig()
    io: Literal["float", "int8"] = "float"  # tflite int8 models: quantized or float inputs/outputs
    # ORT format: layouts baked in for this platform. amd64-vnni: x86-64 with int8 dot-product instructions
    # (AVX512-VNNI, AVX-VNNI), whose kernels take full 8-bit weights; plain amd64 files use 7-bit weights.
    platform: Literal["arm", "amd64", "amd64-vnni"] = "arm"
    threads: int = Field(1, ge=1)
    budgets: Budgets = Budgets()

    @model_validator(mode="after")
    def _backend_can(self):
        """The backend exists and offers what the profile asks of it (precision, platform)."""
        from edge_pipeline.backends import backends

        known = backends()
        if self.backend not in known:
            raise ValueError(f"unknown backend '{self.backend}' (known: {', '.join(known)})")
        spec = known[self.backend].BACKEND
        if self.precision not in spec.precisions:
            raise ValueError(f"backend {self.backend} builds {', '.join(spec.precisions)}, not {self.precision}")
        if self.precision == "int8" and self.quantization.method not in spec.calibration_methods:
            raise ValueError(f"backend {self.backend} calibrates with {', '.join(spec.calibration_methods)}, "
                             f"not {self.quantization.method}")
        if spec.platforms and self.platform not in spec.platforms:
            raise ValueError(f"backend {self.backend} builds for platforms {', '.join(spec.platforms)}, "
                             f"not {self.platform}")
        return self


def ort_platform(machine: str) -> str:
    """The ORT format converter's platform name for a machine name (``platform.machine()``, ``uname -m``)."""
    return "arm" if machine.lower().startswith(("arm", "aarch")) else "amd64"


def host_ort_platform() -> str:
    """This machine's ORT platform, ``amd64-vnni`` where /proc/cpuinfo lists int8 dot-product instructions."""
    import platform

    host = ort_platform(platform.machine())
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return host
    return "amd64-vnni" if host == "amd64" and flags & {"avx512_vnni", "avx_vnni"} else host


def converter_platform(profile: Profile) -> str:
    """The ORT format converter's platform for a profile (VNNI or not, the layouts are x86's)."""
    return profile.platform.removesuffix("-vnni")


def platform_notes(profile: Profile, machine: str | None) -> list[str]:
    """Why a latency measured on ``machine`` may not be the target's: an ORT file has its platform's layouts
    baked in, and one built for arm runs several times slower on x86 (and the other way round)."""
    if profile.backend != "onnxruntime" or not machine or ort_platform(machine) == converter_platform(profile):
        return []
    return [f"ORT file optimized for {profile.platform}, measured on {machine}: latency is not the target's"]


def targets_config(names: list[str]) -> dict:
    """The profiles' full content: what a stage building for these targets depends on (its cache key)."""
    return {"targets": [load_profile(t).model_dump() for t in names]}


def profile_dirs() -> list[Path]:
    dirs = [Path.cwd() / "targets", BUILTIN_DIR]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def list_profiles() -> list[Profile]:
    seen: dict[str, Profile] = {}
    for d in profile_dirs():
        for f in sorted(d.glob("*.yaml")):
            seen.setdefault(f.stem, load_profile(str(f)))
    return list(seen.values())


_ORT_PLATFORM: list[str] = []  # set by ``ort_files_for``


@contextmanager
def ort_files_for(platform: str):
    """Within: every ONNX Runtime profile builds its ORT file for ``platform``. ``bench`` times on this machine,
    and an ORT file optimized (and, on x86, quantized) for another platform would measure the mismatch."""
    _ORT_PLATFORM.append(platform)
    try:
        yield
    finally:
        _ORT_PLATFORM.pop()


def load_profile(name: str, where: str | None = None) -> Profile:
    profile = _load_profile(name, where)
    if _ORT_PLATFORM and profile.backend == "onnxruntime":
        profile = profile.model_copy(update={"platform": _ORT_PLATFORM[-1]})
    return profile


def _load_profile(name: str, where: str | None = None) -> Profile:
    path = Path(name)
    if not (name.endswith((".yaml", ".yml")) and path.is_file()):
        found = [d / f"{name}.yaml" for d in profile_dirs() if (d / f"{name}.yaml").is_file()]
        if not found:
            known = sorted({f.stem for d in profile_dirs() for f in d.glob("*.yaml")})
            raise PipelineError(f"unknown target profile '{name}'", where=where,
                                hint=f"known profiles: {', '.join(known)}; or give a path to a .yaml file")
        path = found[0]
    try:
        data = yaml.safe_load(path.read_text())
        return Profile.model_validate(data)
    except yaml.YAMLError as e:
        raise PipelineError(f"target profile is not valid YAML: {e}", where=str(path)) from None
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise PipelineError(f"bad target profile: {err['msg']}", where=f"{path}: {key}") from None

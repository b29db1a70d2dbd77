"""What is installed: the runtimes each backend needs, and the tools remote devices need."""

from __future__ import annotations

import shutil
from importlib import metadata

BACKEND_PACKAGES = {
    "executorch": ("torch", "executorch"),
    "onnxruntime": ("torch", "onnx", "onnxscript", "onnxruntime"),
    "tflite": ("torch", "litert-torch", "ai-edge-litert"),
}
DEVICE_TOOLS = ("ssh", "scp", "adb")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def backend_status() -> dict[str, dict]:
    out = {}
    for backend, pkgs in BACKEND_PACKAGES.items():
        versions = {p: _version(p) for p in pkgs}
        out[backend] = {"ok": all(versions.values()), "packages": versions, "needs": list(pkgs)}
    return out


def tool_status() -> dict[str, str | None]:
    return {t: shutil.which(t) for t in DEVICE_TOOLS}

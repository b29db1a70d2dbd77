"""What is installed: the runtimes each backend needs, and the tools remote devices need."""

from __future__ import annotations

import shutil
from importlib import metadata

DEVICE_TOOLS = ("ssh", "scp", "adb")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def backend_status() -> dict[str, dict]:
    out = {}
    from edge_pipeline.backends import backends

    for backend, mod in backends().items():
        pkgs = mod.BACKEND.packages
        versions = {p: _version(p) for p in pkgs}
        out[backend] = {"ok": all(versions.values()), "packages": versions, "needs": list(pkgs)}
    return out


def tool_status() -> dict[str, str | None]:
    return {t: shutil.which(t) for t in DEVICE_TOOLS}

"""What every device kind shares: the parsed spec, the error a failed step raises, running a host tool with a
timeout, and the Device contract itself. The kinds (local and ssh in ``devices``, adb in ``devices.adb``) build
on this module only, so none imports another."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_pipeline.errors import PipelineError


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # local | ssh | adb
    spec: str
    user: str | None = None
    host: str | None = None
    port: int = 22
    serial: str | None = None
    options: dict[str, str] = field(default_factory=dict)


class DeviceError(PipelineError):
    """A step on a device failed: names the device, the step and what it printed."""

    def __init__(self, device: str, step: str, detail: str, hint: str | None = None):
        super().__init__(f"{step} failed: {detail.strip()[-800:]}", where=f"device {device}", hint=hint,
                         exit_code=1)
        self.step = step


def run_tool(argv: list[str], timeout: float, device: str, step: str, *, cwd: Path | None = None,
             dropped=lambda res: False, hint: str | None = None,
             missing_hint: str | None = None) -> subprocess.CompletedProcess:
    """Run a host tool (the runner, ssh, scp, adb) with a timeout, once more when ``dropped(result)`` says the
    connection fell; a missing tool or a timeout becomes a DeviceError naming the device and the step."""
    for attempt in (1, 2):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        except FileNotFoundError:
            raise DeviceError(device, step, f"{argv[0]} is not installed", hint=missing_hint) from None
        except subprocess.TimeoutExpired:
            raise DeviceError(device, step, f"no answer within {timeout:.0f}s (killed)", hint=hint) from None
        if attempt == 2 or not dropped(res):
            return res
    raise AssertionError("unreachable")


class Device(Protocol):
    """What the device test asks of every device kind (local, ssh, adb; a device farm would be one more).

    ``runs_python``: the harness (runner and runtime modules) runs there with ``python``; where False (a stock
    phone) each backend's own benchmark binary runs instead, through ``benchmark`` (``BACKEND.device_tool``)."""

    spec: DeviceSpec
    runs_python: bool

    def push(self, files: list[Path]) -> None: ...
    def run(self, argv: list[str], step: str) -> tuple[int, str, str]: ...
    def pull(self, name: str, dest: Path) -> None: ...
    def info(self) -> dict: ...
    def close(self) -> None: ...

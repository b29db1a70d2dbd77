"""Where a device test runs: ``local``, ``ssh://user@host[:port]``, ``adb://SERIAL``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_pipeline.errors import PipelineError

_SSH = re.compile(r"^ssh://(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.:_\[\]-]+?)(?::(?P<port>\d+))?$")
_ADB = re.compile(r"^adb://(?P<serial>[A-Za-z0-9._:-]+)$")


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # local | ssh | adb
    spec: str
    user: str | None = None
    host: str | None = None
    port: int = 22
    serial: str | None = None


def parse_device(spec: str, where: str | None = None) -> DeviceSpec:
    if spec == "local":
        return DeviceSpec("local", spec)
    if m := _SSH.match(spec):
        return DeviceSpec("ssh", spec, user=m["user"], host=m["host"], port=int(m["port"] or 22))
    if m := _ADB.match(spec):
        return DeviceSpec("adb", spec, serial=m["serial"])
    raise PipelineError(f"unknown device '{spec}'", where=where,
                        hint="use local, ssh://user@host[:port] or adb://SERIAL")

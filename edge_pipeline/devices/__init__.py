"""Where a device test runs: ``local``, ``ssh://user@host[:port][?key=PATH&python=PATH]``, ``adb://SERIAL``.

A device copies files over, runs a command, and copies results back. Every command is an argument list:
locally it runs without a shell; over SSH each argument is quoted for the remote shell.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import parse_qs

from edge_pipeline.devices.base import Device, DeviceError, DeviceSpec, run_tool
from edge_pipeline.errors import PipelineError

_SSH = re.compile(r"^ssh://(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9._-]+|\[[0-9a-fA-F:]+\])"
                  r"(?::(?P<port>\d+))?(?:\?(?P<query>.*))?$")
_ADB = re.compile(r"^adb://(?P<serial>[A-Za-z0-9._:-]+)(?:\?(?P<query>.*))?$")
SSH_DROPPED = 255  # ssh's own exit code for a connection that failed or dropped


def parse_device(spec: str, where: str | None = None) -> DeviceSpec:
    if spec == "local":
        return DeviceSpec("local", spec)
    if m := _SSH.match(spec):
        opts = {k: v[-1] for k, v in parse_qs(m["query"] or "").items()}
        return DeviceSpec("ssh", spec, user=m["user"], host=m["host"].strip("[]"), port=int(m["port"] or 22),
                          options=opts)
    if m := _ADB.match(spec):
        opts = {k: v[-1] for k, v in parse_qs(m["query"] or "").items()}
        return DeviceSpec("adb", spec, serial=m["serial"], options=opts)
    raise PipelineError(f"unknown device '{spec}'", where=where,
                        hint="use local, ssh://user@host[:port][?key=PATH&python=PATH] or adb://SERIAL")


class LocalDevice:
    """This host: a temporary folder and a fresh subprocess per run."""

    runs_python = True

    def __init__(self, spec: DeviceSpec, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.python = spec.options.get("python", sys.executable)
        self.workdir = Path(tempfile.mkdtemp(prefix="edge-device-"))

    def push(self, files: list[Path]) -> None:
        for f in files:
            shutil.copy(f, self.workdir / f.name)

    def path(self, name: str) -> str:
        return str(self.workdir / name)

    def run(self, argv: list[str], step: str) -> tuple[int, str, str]:
        res = run_tool(argv, self.timeout, self.spec.spec, step, cwd=self.workdir,
                       hint="raise device_test.timeout_s, or look for a runner that hangs")
        return res.returncode, res.stdout, res.stderr

    def pull(self, name: str, dest: Path) -> None:
        shutil.copy(self.workdir / name, dest)

    def info(self) -> dict:
        import platform

        return {"device": "local", "arch": platform.machine(), "os": f"{platform.system()} {platform.release()}"}

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class SSHDevice:
    """A Linux board over ssh/scp: a temporary folder on the board, removed at the end."""

    runs_python = True

    def __init__(self, spec: DeviceSpec, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.python = spec.options.get("python", "python3")
        self.target = f"{spec.user}@{spec.host}"
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={min(int(timeout), 20)}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if "key" in spec.options:
            opts += ["-i", spec.options["key"], "-o", "IdentitiesOnly=yes"]
        if "known_hosts" in spec.options:
            opts += ["-o", f"UserKnownHostsFile={spec.options['known_hosts']}", "-o", "StrictHostKeyChecking=yes"]
        else:
            opts += ["-o", "StrictHostKeyChecking=accept-new"]
        self.ssh = ["ssh", "-p", str(spec.port), *opts, self.target]
        self.scp = ["scp", "-q", "-P", str(spec.port), *opts]
        self.workdir = f"/tmp/edge-device-{uuid.uuid4().hex[:12]}"
        self._call(self.ssh + ["--", "mkdir", "-p", self.workdir], "connect")

    def _call(self, argv: list[str], step: str) -> tuple[int, str, str]:
        res = run_tool(argv, self.timeout, self.spec.spec, step, dropped=lambda r: r.returncode == SSH_DROPPED,
                       hint="check the board is up; raise device_test.timeout_s",
                       missing_hint="install an OpenSSH client (Debian: openssh-client)")
        if res.returncode == SSH_DROPPED:
            raise DeviceError(self.spec.spec, step, res.stderr or "ssh could not connect",
                              hint="check host, port, user and key (ssh://user@host:port?key=PATH)")
        return res.returncode, res.stdout, res.stderr

    def push(self, files: list[Path]) -> None:
        code, _, err = self._call(self.scp + [str(f) for f in files] + [f"{self.target}:{self.workdir}/"], "push")
        if code != 0:
            raise DeviceError(self.spec.spec, "push", err)

    def path(self, name: str) -> str:
        return f"{self.workdir}/{name}"

    def run(self, argv: list[str], step: str) -> tuple[int, str, str]:
        remote = "cd " + shlex.quote(self.workdir) + " && " + " ".join(shlex.quote(a) for a in argv)
        return self._call(self.ssh + ["--", remote], step)

    def pull(self, name: str, dest: Path) -> None:
        code, _, err = self._call(self.scp + [f"{self.target}:{self.workdir}/{name}", str(dest)], "pull")
        if code != 0:
            raise DeviceError(self.spec.spec, "pull", err)

    def info(self) -> dict:
        code, out, _ = self.run(["uname", "-m", "-s", "-r"], "info")
        return {"device": self.spec.spec, "uname": out.strip() if code == 0 else None}

    def close(self) -> None:
        try:
            self._call(self.ssh + ["--", "rm", "-rf", shlex.quote(self.workdir)], "cleanup")
        except PipelineError:
            pass


def open_device(spec: DeviceSpec, timeout: float) -> Device:
    if spec.kind == "local":
        return LocalDevice(spec, timeout)
    if spec.kind == "ssh":
        return SSHDevice(spec, timeout)
    from edge_pipeline.devices.adb import ADBDevice

    return ADBDevice(spec, timeout)

"""The SSH device for real: sshd from Debian's openssh-server on a loopback port, a throw-away key."""

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_devices import _test, lowered  # noqa: F401  (fixture)

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# Skipped only on a developer machine without sshd; in CI (.ci/run installs it) a missing sshd fails.
pytestmark = pytest.mark.skipif(not Path(SSHD).exists() and not os.environ.get("CI"),
                                reason="needs Debian's openssh-server (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield d, port
    proc.terminate()
    proc.wait(timeout=10)


def _spec(d, port, key="client", python=sys.executable):
    return f"ssh://{getpass.getuser()}@127.0.0.1:{port}?key={d / key}&known_hosts={d / 'known_hosts'}&python={python}"


def test_ssh_results_equal_local_results(sshd, lowered, digits):  # noqa: F811
    d, port = sshd
    spec = _spec(d, port)
    res = _test(lowered, digits, ["local", spec])
    for by_device in res["results"].values():
        local, remote = by_device["local"], by_device[spec]
        assert "error" not in remote, remote
        assert remote["test_metric"] == local["test_metric"]
        assert remote["agreement_with_teacher"] == local["agreement_with_teacher"]
        assert remote["size_bytes"] == local["size_bytes"] and remote["latency"]["runs"] == 5
    leftovers = list(Path("/tmp").glob("edge-device-*"))
    assert not [p for p in leftovers if p.stat().st_mtime > time.time() - 60], "the board's temp folder is removed"


def test_wrong_key_is_a_clear_error(sshd, lowered, digits):  # noqa: F811
    d, port = sshd
    spec = _spec(d, port, key="stranger")
    res = _test(lowered, digits, [spec], timeout=30)
    err = res["results"]["ort-mobile-fp32"][spec]["error"]
    assert "connect failed" in err and "Permission denied" in err


def test_board_without_the_runtime_fails_each_target_with_its_message(sshd, lowered, digits, tmp_path):  # noqa: F811
    d, port = sshd
    bare = tmp_path / "bare-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    spec = _spec(d, port, python=bare / "bin" / "python")
    res = _test(lowered, digits, [spec], timeout=60)
    for r in res["results"].values():
        assert "runner exited with 1" in r[spec]["error"] and "No module named 'numpy'" in r[spec]["error"]


def test_runner_that_hangs_is_stopped_by_the_timeout(sshd, lowered, digits, tmp_path):  # noqa: F811
    d, port = sshd
    hang = tmp_path / "hanging-python"
    hang.write_text("#!/bin/sh\nsleep 120\n")
    hang.chmod(0o755)
    spec = _spec(d, port, python=hang)
    started = time.time()
    res = _test(lowered, digits, [spec], timeout=5)
    assert time.time() - started < 60
    for r in res["results"].values():
        assert "no answer within 5s" in r[spec]["error"]

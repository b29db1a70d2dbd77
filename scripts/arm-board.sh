#!/usr/bin/env bash
# An arm64 board on this x86 machine, for real ARM kernels: Debian bookworm's arm64 python3.11 run under
# qemu-user, with the aarch64 wheels of onnxruntime and numpy, reached over ssh like any board
# (ssh://...?python=<repo>/.arm-board/python). Results from it carry conditions.emulated: parity and accuracy
# are ARM-kernel results, latency is not the board's.
#
# What is not on this board, and why:
# - ExecuTorch: its Python runtime loads libtorch, and the only torch 2.13.0 aarch64 wheel a package registry
#   offers (PyPI) is a CUDA build (libtorch_cuda.so needs libcudart.so.13, libcudnn.so.9, libnccl.so.2).
# - LiteRT: ai-edge-litert and tflite-runtime publish no cp311 manylinux aarch64 wheel.
# Both are reported per target as "runtime not available on this board".
#
# Needs root (apt-get; the wrapper bind-mounts an ARM /proc/cpuinfo in a private mount namespace, because
# qemu-user 7.2 passes the host's x86 /proc/cpuinfo through and ONNX Runtime's cpuinfo crashes reading it).
set -euo pipefail
cd "$(dirname "$0")/.."
BOARD="$PWD/.arm-board"
PY="${PYTHON:-$PWD/.venv/bin/python}"
ORT_VERSION="$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')"
NUMPY_VERSION="$("$PY" -c 'import numpy; print(numpy.__version__)')"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static debootstrap >/dev/null
fi
# The Debian mirror: the one this machine's apt is set up to reach (its one-line sources.list entries or deb822
# .sources files, the first archive that is not the security one), or MIRROR=<url> given by the user.
if [ -z "${MIRROR:-}" ]; then
  MIRROR="$( { grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                 | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) {print $i; break}}'
               grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
             } | grep -v -- '-security' | head -n1 || true)"
fi
if [ -z "$MIRROR" ]; then
  echo "arm-board.sh: no Debian mirror in this machine's apt configuration (/etc/apt/sources.list*);" \
       "give one: MIRROR=http://<mirror>/debian $0" >&2
  exit 2
fi
rm -rf "$BOARD.tmp" && mkdir -p "$BOARD.tmp/root" "$BOARD.tmp/site" "$BOARD.tmp/wheels"

# Debian's arm64 userland, unpacked only (the second stage would have to run arm64 binaries; python needs none
# of the maintainer scripts).
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libpython3.11-stdlib \
  bookworm "$BOARD.tmp/root" "$MIRROR" >"$BOARD.tmp/debootstrap.log"
for deb in "$BOARD.tmp"/root/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$BOARD.tmp/root"; done
rm -f "$BOARD.tmp"/root/var/cache/apt/archives/*.deb

# The aarch64 wheels, the same versions as this machine's, unpacked into the board's site folder.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
  -d "$BOARD.tmp/wheels" "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION" flatbuffers protobuf packaging \
  coloredlogs humanfriendly sympy mpmath 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
for whl in "$BOARD.tmp"/wheels/*.whl; do (cd "$BOARD.tmp/site" && "$PY" -m zipfile -e "$whl" .); done
rm -rf "$BOARD.tmp/wheels"

# /proc/cpuinfo of a Cortex-A72 board with this machine's core count.
"$PY" - "$BOARD.tmp/cpuinfo" <<'PYEOF'
import os, sys
block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
         "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n")
open(sys.argv[1], "w").write("\n".join(block.format(i=i) for i in range(os.cpu_count() or 1)))
PYEOF

cat >"$BOARD.tmp/python" <<'SHEOF'
#!/bin/sh
# The arm64 board's python: Debian arm64's python3.11 under qemu-user (see scripts/arm-board.sh).
b=$(dirname "$(readlink -f "$0")")
exec unshare -m sh -c 'b=$1; shift; mount --bind "$b/cpuinfo" /proc/cpuinfo &&
  EDGE_PIPELINE_EMULATED=qemu-aarch64 PYTHONPATH="$b/site" exec qemu-aarch64-static -L "$b/root" "$b/root/usr/bin/python3.11" "$@"' \
  sh "$b" "$@"
SHEOF
chmod +x "$BOARD.tmp/python"
rm -rf "$BOARD" && mv "$BOARD.tmp" "$BOARD"
"$BOARD/python" -c 'import platform, onnxruntime; print("arm64 board ready:", platform.machine(), "onnxruntime", onnxruntime.__version__)'

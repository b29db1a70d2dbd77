"""ONNX -> ORT format in a process of its own, set up so that the same model.onnx gives the same bytes.

ORT's converter writes the .ort file's kernel-type-string resolver (which type each op's kernels take) in an
order that follows heap addresses and thread timing: three conversions of one model.onnx gave three sha256s.
With address-space randomization off for the converting process (``personality(ADDR_NO_RANDOMIZE)`` before
exec, what ``setarch -R`` does), one intra-op and one inter-op thread, a fixed ``PYTHONHASHSEED``, a scratch
folder whose path has one length and a trimmed environment (output folders of other path lengths, or another
environment, gave other digests before), conversions of one model.onnx gave one digest over 24 folders and
environments of different sizes. The parent calls :func:`convert`; ``python -m`` runs
:func:`main` in the child.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edge_pipeline.errors import PipelineError

ADDR_NO_RANDOMIZE = 0x0040000  # <sys/personality.h>
# Not the user's TMPDIR: the scratch folder's path is the same whoever builds.
SCRATCH_ROOT = "/tmp"


def _no_address_randomization() -> None:
    """Runs in the child between fork and exec: the exec'd interpreter gets a fixed address layout (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)  # 0xffffffff queries without changing
    if current != -1:
        libc.personality(current | ADDR_NO_RANDOMIZE)


# What the child keeps of the environment: Python copies its environment onto the heap, so variables that differ
# between two builds (the folder, the shell's history, a test's name) moved the converter's output too.
KEPT_ENV = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "HOME", "LANG")


def convert(onnx_path: Path, out_dir: Path, platform: str) -> str:
    """Converts in a child process; copies model.ort and the converter's operator list into ``out_dir``; returns
    what the converter printed. Raises PipelineError with its last lines when it fails."""
    out_dir = Path(out_dir)
    scratch = Path(SCRATCH_ROOT) / f"edge-pipeline-ort-format-{os.getuid()}"
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    # No cached bytecode read or written: whether a module's .pyc existed changed the heap, and with it the
    # resolver's order; compiling every module from source each time costs a few seconds and is the same each time.
    env.update(PYTHONHASHSEED="0", PWD="/", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPYCACHEPREFIX=str(scratch / "no-bytecode"))
    # One fixed folder (its path is on the child's sys.path and in the converter's strings), one conversion at a
    # time: a lock file beside it.
    with open(f"{scratch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        try:
            shutil.copyfile(onnx_path, scratch / "model.onnx")
            res = subprocess.run([sys.executable, "-m", __name__, "model.onnx", ".", platform], cwd=scratch,
                                 capture_output=True, text=True, env=env, check=False,
                                 preexec_fn=_no_address_randomization)
            said = (res.stdout + res.stderr).strip()
            if res.returncode != 0 or not (scratch / "model.ort").is_file():
                raise PipelineError(f"ORT format conversion failed: {said[-600:]}", where=str(onnx_path))
            out_dir.mkdir(parents=True, exist_ok=True)
            for made in [scratch / "model.ort", *scratch.glob("*required_operators*.config")]:
                shutil.copyfile(made, out_dir / made.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return said


def main(argv: list[str]) -> int:
    import logging

    # onnxruntime.tools imports torch when it can find it, for a helper the converter never calls: 3 of the
    # child's 6 seconds. A None entry makes find_spec answer "absent".
    sys.modules["torch"] = None  # type: ignore[assignment]
    import onnxruntime.tools.convert_onnx_models_to_ort as converter

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config in <full path>"
    make_options = converter._create_session_options

    def one_thread(*args, **kwargs):  # the converter builds its SessionOptions here and exposes no threads knob
        options = make_options(*args, **kwargs)
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return options

    converter._create_session_options = one_thread
    onnx_path, out_dir, platform = Path(argv[0]), Path(argv[1]), argv[2]
    converter.convert_onnx_models_to_ort(onnx_path, out_dir, [converter.OptimizationStyle.Fixed],
                                         target_platform=platform)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

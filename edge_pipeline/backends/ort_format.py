"""ONNX -> ORT format in a process of its own, set up so that the same model.onnx gives the same bytes.

ORT's converter writes the .ort file's kernel-type-string resolver (which type each op's kernels take) in an
order that follows heap addresses and thread timing: three conversions of one model.onnx gave three sha256s.
With address-space randomization off for the converting process (``personality(ADDR_NO_RANDOMIZE)`` before
exec, what ``setarch -R`` does), one intra-op and one inter-op thread, a fixed ``PYTHONHASHSEED``, and the
same relative paths whatever the folder (folders of three path lengths gave two digests before), every
conversion of one model.onnx gave one digest. The parent calls :func:`convert`; ``python -m`` runs
:func:`main` in the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge_pipeline.errors import PipelineError

ADDR_NO_RANDOMIZE = 0x0040000  # <sys/personality.h>


def _no_address_randomization() -> None:
    """Runs in the child between fork and exec: the exec'd interpreter gets a fixed address layout (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)  # 0xffffffff queries without changing
    if current != -1:
        libc.personality(current | ADDR_NO_RANDOMIZE)


def convert(onnx_path: Path, out_dir: Path, platform: str) -> str:
    """Converts in a child process; returns what the converter printed. Raises PipelineError with its last
    lines when it fails."""
    # The heap layout also follows the lengths of the paths the converter is given: it runs in the output folder
    # and reads the model by a relative name, the same in every folder.
    out_dir = Path(out_dir).resolve()
    onnx_path = Path(onnx_path).resolve()
    env = {**os.environ, "PYTHONHASHSEED": "0", "PWD": "/"}
    src = os.path.relpath(onnx_path, out_dir)
    res = subprocess.run([sys.executable, "-m", __name__, src, ".", platform], cwd=out_dir,
                         capture_output=True, text=True, env=env, check=False,
                         preexec_fn=_no_address_randomization if sys.platform.startswith("linux") else None)
    said = (res.stdout + res.stderr).strip()
    if res.returncode != 0 or not (Path(out_dir) / "model.ort").is_file():
        raise PipelineError(f"ORT format conversion failed: {said[-600:]}", where=str(onnx_path))
    return said


def main(argv: list[str]) -> int:
    import logging

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

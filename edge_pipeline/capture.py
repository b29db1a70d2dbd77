"""Other libraries' output goes to a log file, not the terminal.

litert-torch's progress lines, TensorFlow/absl C++ logs, ExecuTorch's "Resetting threadpool", torch's
warnings and ORT's prints are written straight to file descriptors 1 and 2, several from C++, so the file
descriptors themselves are redirected (``os.dup2``) for the time a stage runs. The CLI switches this on
(``--verbose`` leaves it off) and keeps its own console on a copy of the terminal's descriptor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_enabled: ContextVar[bool] = ContextVar("edge_pipeline_capture", default=False)
# Switches the libraries read when they start: set before they are imported, unless the user set them.
QUIET_ENV = {"LITERT_TORCH_SHOW_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def enable() -> None:
    """Send other libraries' output to stage logs from now on (the CLI calls this unless --verbose)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    _enabled.set(True)


def terminal_stream():
    """A stream on a copy of the terminal's stderr: what the CLI's console writes to, so its progress bars
    and messages still show while descriptor 2 goes to a log."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # no real descriptor (an in-process test runner)
        return sys.stderr


@contextmanager
def to_log(path: Path) -> Iterator[Path]:
    """Descriptors 1 and 2 append to ``path`` inside the block (when enabled); yields the log's path."""
    if not _enabled.get():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


# Written into a failed stage's log before the crash's traceback: the log keeps it, the terminal shows the
# libraries' lines before it (the error line itself is printed after them).
TRACEBACK_MARK = "\n--- edge-pipeline: the failure's traceback ---\n"


def tail(path: Path, lines: int = 15) -> list[str]:
    """The last lines of a log that libraries wrote (what a failure shows beside the log's path)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.split(TRACEBACK_MARK)[0].splitlines()[-lines:]

"""Files that ship beside the code: the built-in target profiles and the device suite (the runner in it).

In a checkout they are the repository's ``targets/`` and ``device_tests/``, where users see and edit them; an
installed wheel carries the same folders as ``edge_pipeline/_targets`` and ``edge_pipeline/_device_tests``
(pyproject.toml maps them), since nothing outside the package is installed.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(folder: str) -> Path:
    """``targets`` or ``device_tests``: the installed copy when there is one, else the checkout's."""
    installed = PACKAGE / f"_{folder}"
    return installed if installed.is_dir() else PACKAGE.parent / folder

"""ExecuTorch's Python runtime for .pte files (it takes torch tensors, so torch is imported too)."""

from __future__ import annotations

SUFFIXES = (".pte",)
SIDECARS = ()  # files beside the artifact that are part of it


def load() -> None:
    """Import the runtime (before the runner's clock starts); ImportError where it is not installed."""
    import executorch.runtime  # noqa: F401
    import torch  # noqa: F401


def open_model(path: str, threads: int):
    """(the runtime's distribution name, run) where ``run(list of arrays) -> list of arrays``."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if portable_lib._threadpool_get_thread_count() != threads:  # it prints a line each call
        portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")
    return "executorch", lambda xs: [t.numpy() for t in method.execute([torch.from_numpy(x) for x in xs])]


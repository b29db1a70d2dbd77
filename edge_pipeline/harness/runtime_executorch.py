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



def profile(path: str, inputs, threads: int, runs: int, folder: str) -> list[dict]:
    """Per-operator times from ExecuTorch's own profiler (ETDump): one row per op of the XNNPACK delegate (and
    each portable op), its median over ``runs`` executions. No debug buffer: on 224x224 models it overflows."""
    import os

    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path, enable_etdump=True)
    method = program.load_method("forward")
    xs = [torch.from_numpy(x) for x in inputs]
    for _ in range(runs):
        method.execute(xs)
    etdump = os.path.join(folder, "profile.etdp")
    program.write_etdump_result_to_file(etdump, os.path.join(folder, "profile.debug"))
    df = Inspector(etdump_path=etdump).to_dataframe()
    rows = []
    for _, r in df[df.event_block_name == "Execute"].iterrows():
        name = str(r.event_name)
        if name in ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL") or not len(r.raw):
            continue  # the enclosing spans, not operators
        rows.append({"name": name, "kind": name.split(" #")[0], "ms": float(sorted(r.raw)[len(r.raw) // 2]),
                     "overhead": _overhead(name)})
    return rows


def _overhead(name: str) -> str | None:
    """What an op that computes nothing of the model's is: XNNPACK's pads, converts and transposes."""
    for prefix, what in (("Constant Pad", "pad"), ("Convert", "convert"), ("Transpose", "transpose"),
                         ("Copy", "copy")):
        if name.startswith(prefix):
            return what
    return None

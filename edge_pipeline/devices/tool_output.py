"""What the runtimes' own benchmark binaries print, turned into the runner's result schema (each backend's
parser uses these)."""

from __future__ import annotations

NUM = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"  # a number as the tools print it


def latency(times_ms: list[float] | None = None, **given) -> dict:
    """The runner's latency schema (its own ``latency_stats`` and instability threshold) from per-run times
    where a tool prints them, else from the tool's summary."""
    from edge_pipeline.harness import runner

    lat = dict(given)
    if times_ms:
        lat.update(runner.latency_stats(times_ms), max_ms=float(max(times_ms)),
                   p50_basis="per-run times the tool printed")
    elif lat.get("std_ms") is not None and lat.get("mean_ms"):
        lat["cv"] = lat["std_ms"] / lat["mean_ms"]
        lat["unstable"] = lat["cv"] > runner.UNSTABLE_CV
    return lat

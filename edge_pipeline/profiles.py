"""Per-operator profiles, as the runtimes' own profilers give them (the harness's ``--profile``), summed by kind.

A row is one operator of one run: ``name``, ``kind`` (the runtime's op type), ``ms`` (median over the profiled
runs) and ``overhead`` (``pad``, ``convert``, ``transpose``, ``copy``: ops that compute nothing of the model's,
the price of a layout or a precision boundary), None for the model's own ops.
"""

from __future__ import annotations

TOP_KINDS = 10


def summarize(ops: list[dict]) -> dict:
    """Time by operator kind (the top ``TOP_KINDS``, with their share of the total), and the overhead's share
    by class, the largest named."""
    total = sum(o["ms"] for o in ops)
    by_kind: dict[str, float] = {}
    overhead: dict[str, float] = {}
    for o in ops:
        by_kind[o["kind"]] = by_kind.get(o["kind"], 0.0) + o["ms"]
        if o.get("overhead"):
            overhead[o["overhead"]] = overhead.get(o["overhead"], 0.0) + o["ms"]

    def share(ms: float) -> float:
        return ms / total if total else 0.0

    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    largest = max(overhead.items(), key=lambda kv: kv[1], default=None)
    return {"total_ms": total, "ops": len(ops),
            "top_kinds": [{"kind": k, "ms": ms, "share": share(ms)} for k, ms in kinds[:TOP_KINDS]],
            "overhead_share": share(sum(overhead.values())),
            "overhead": {k: share(ms) for k, ms in sorted(overhead.items())},
            "largest_overhead": None if largest is None else {"class": largest[0], "share": share(largest[1])}}


def overhead_line(target: str, device: str, profile: dict | None) -> str | None:
    """One line for the CLI: where an int8 target's time goes that is not the model's own."""
    if not profile:
        return None
    if "unavailable" in profile:
        return f"{target} on {device}: {profile['unavailable']}"
    s = profile.get("summary") or {}
    big = s.get("largest_overhead")
    if big is None:
        return f"{target} on {device}: no pad, convert or transpose ops ({s.get('ops', 0)} ops profiled)"
    rest = ", ".join(f"{k} {v:.0%}" for k, v in s["overhead"].items())
    return (f"{target} on {device}: largest overhead {big['class']} {big['share']:.0%} of op time "
            f"(overhead {s['overhead_share']:.0%}: {rest})")

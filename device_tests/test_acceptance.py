"""Each target on each device against its profile's budgets: size, p50 latency, the recipe metric's drop."""

from edge_pipeline.targets import load_profile


def test_target_meets_its_budgets(case):
    target, device, m = case
    assert "error" not in m, f"{target} on {device}: {m['error']}"
    missed = load_profile(target).budgets.violations(size_bytes=m["size_bytes"], accuracy_drop=m.get("metric_drop"),
                                                     p50_ms=m["latency"]["p50_ms"])
    assert not missed, f"{target} on {device}: {'; '.join(missed)}"
    assert not m.get("failures"), m["failures"]

"""Each target on each device against its profile's budgets: size, p50 latency, accuracy drop."""

from edge_pipeline.targets import load_profile


def test_target_meets_its_budgets(case):
    target, device, m, float_accuracy = case
    assert "error" not in m, f"{target} on {device}: {m['error']}"
    b = load_profile(target).budgets
    if b.max_size_bytes:
        assert m["size_bytes"] <= b.max_size_bytes, f"size {m['size_bytes']} > {b.max_size_bytes}"
    if b.max_latency_ms:
        assert m["latency"]["p50_ms"] <= b.max_latency_ms, f"p50 {m['latency']['p50_ms']:.3f} ms > {b.max_latency_ms}"
    if b.max_accuracy_drop is not None and float_accuracy is not None and "test_accuracy" in m:
        drop = float_accuracy - m["test_accuracy"]
        assert drop <= b.max_accuracy_drop + 1e-9, f"accuracy drop {drop:.4f} > {b.max_accuracy_drop}"
    assert not m.get("failures"), m["failures"]

"""Each target on each device against its profile's budgets: size, p50 latency, the recipe metric's drop."""

from edge_pipeline.device_testing import acceptance_failures


def test_target_meets_its_budgets(case):
    target, device, m = case
    failures = acceptance_failures(target, device, m)
    assert not failures, "; ".join(failures)

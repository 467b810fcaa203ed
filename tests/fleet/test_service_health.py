"""The managed service's health as the fleet tile and the node page show it: failing on its
own health check, degraded over the canary gate's default limits, unknown when unreported."""

from __future__ import annotations

import pytest

from updates.fleet.selectors import ServiceState, service_health
from updates.rollout_options import GateOptions

GATE = GateOptions()


@pytest.mark.parametrize(
    ("healthy", "error_rate", "p99", "state", "detail"),
    [
        (None, None, None, ServiceState.UNKNOWN, ""),
        (True, None, None, ServiceState.HEALTHY, ""),
        (True, GATE.max_error_rate, GATE.max_p99_ms, ServiceState.HEALTHY, ""),  # at the limit
        (None, 0.01, 120.0, ServiceState.HEALTHY, ""),
        (False, 0.0, 10.0, ServiceState.FAILING, "its health check fails"),
        (False, None, None, ServiceState.FAILING, "its health check fails"),
        (True, 0.2, None, ServiceState.DEGRADED, "error rate 20.0% above 5.0%"),
        (True, None, 1800.0, ServiceState.DEGRADED, "p99 latency 1800 ms above 500 ms"),
        (
            None,
            0.06,
            501.0,
            ServiceState.DEGRADED,
            "error rate 6.0% above 5.0%; p99 latency 501 ms above 500 ms",
        ),
    ],
)
def test_service_health(
    healthy: bool | None,
    error_rate: float | None,
    p99: float | None,
    state: ServiceState,
    detail: str,
) -> None:
    health = service_health(healthy, error_rate, p99)
    assert (health.state, health.detail) == (state, detail)
    assert health.label == state.label


def test_the_figures_read_as_an_operator_reads_them() -> None:
    health = service_health(True, 0.0123, 87.4)
    assert (health.error_rate_text, health.p99_text) == ("1.23%", "87 ms")
    unknown = service_health(None, None, None)
    assert (unknown.error_rate_text, unknown.p99_text) == ("—", "—")

"""Generated reports and envelopes fed to every agent-report task: no exception ever,
and a refused report (counted) leaves every node and job as it was."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Fleet
from tests.factories import make_release
from tests.security.signing import key_of, signed_report
from updates.engine.reports import ReportType
from updates.fleet import tasks as fleet_tasks
from updates.models import Event, Node, ReportRejection, UpdateJob

pytestmark = pytest.mark.django_db

HOSTILE_NUMBERS = st.sampled_from(
    [10**400, -(10**400), 2**63, 2**63 - 1, -1, 0, 101, float("nan"), float("inf"), -0.0, 1e308]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HOSTILE_NUMBERS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "x" * 5000, "1; drop", "ACCEPTED", "DONE", "active"]),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "job_id",
    "step",
    "percent",
    "bytes_done",
    "bytes_total",
    "ok",
    "error_code",
    "error_message",
    "result",
    "installed_version",
    "raft_role",
    "disk_free_bytes",
    "disk_total_bytes",
    "memory_available_bytes",
    "load_1m",
    "restore_points",
    "restore_points_bytes",
    "error_rate",
    "p99_latency_ms",
    "service_healthy",
    "last_job",
    "active_job_id",
    "traffic_role",
    "commands_refused",
]
PAYLOADS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSONISH, max_size=8)
TASKS = {
    ReportType.HEARTBEAT: fleet_tasks.record_heartbeat,
    ReportType.JOB_PROGRESS: fleet_tasks.job_progress,
    ReportType.JOB_FINISHED: fleet_tasks.job_finished,
}


def _snapshot() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes = [dict(row) for row in Node.objects.order_by("pk").values()]
    jobs = [dict(row) for row in UpdateJob.objects.order_by("pk").values()]
    return nodes, jobs


def _refused() -> int:
    return sum(
        ReportRejection.objects.filter(reason=ReportRejection.Reason.ALL).values_list(
            "count", flat=True
        )
    )


@pytest.mark.parametrize("task_type", list(ReportType))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=PAYLOADS,
    signed_as=st.sampled_from(list(ReportType)),
    mangle=st.sampled_from(["none", "seq", "sig", "ts", "raw"]),
    junk=JSONISH,
)
def test_generated_reports_never_raise_and_refusals_write_nothing(
    fleet: Fleet,
    task_type: ReportType,
    payload: dict[str, Any],
    signed_as: ReportType,
    mangle: str,
    junk: Any,
) -> None:
    job = UpdateJob.objects.filter(node=fleet.node_a).first() or UpdateJob.objects.create(
        node=fleet.node_a, release=make_release(version="1.9.0"), state=UpdateJob.State.VERIFYING
    )
    if isinstance(payload.get("job_id"), bool) or "job_id" not in payload:
        payload["job_id"] = str(job.pk)
    envelope: Any = signed_report("a-1", signed_as, payload, key=key_of("a-1"))
    if mangle == "seq":
        envelope["seq"] = junk
    elif mangle == "sig":
        envelope["sig"] = junk
    elif mangle == "ts":
        envelope["ts"] = junk
    elif mangle == "raw":
        envelope = junk
    before, refused, events = _snapshot(), _refused(), Event.objects.count()
    TASKS[task_type](envelope=envelope)  # must not raise, whatever came in
    if _refused() > refused:
        # Refused: only the counter moved (and at most one audit Event).
        assert _snapshot() == before
        assert Event.objects.count() - events <= 1

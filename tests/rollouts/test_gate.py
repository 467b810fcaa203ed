"""The canary gate on its own: which metrics count, when it waits, when it fails a
silent node, what it reports, and the bake time after a stage completed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.conf import settings

from tests.factories import make_node, make_release, make_tenant
from updates.models import Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollout_options import GateOptions
from updates.rollouts.gate import (
    GateVerdict,
    baking,
    canary_gate,
    fresh_metrics_wait,
    metric_breaches,
)
from updates.rollouts.records import Decision

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BAKE = 60


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0")


def _rollout(release: Release, **gate: Any) -> Rollout:
    return Rollout.objects.create(
        release=release, strategy="canary", state="RUNNING", options={"gate": gate}
    )


def _row(
    rollout: Rollout,
    node_id: str,
    *,
    finished: datetime | None = T0,
    heartbeat: datetime | None = None,
    no_job: bool = False,
    **metrics: Any,
) -> RolloutNode:
    """A canary node whose update job finished at `finished` (None: still applying; with
    `no_job`, not started at all), its last heartbeat, and its reported metrics."""
    fields: dict[str, Any] = {"status": Node.Status.ONLINE, "service_healthy": True, **metrics}
    node = make_node(node_id=node_id, tenant=make_tenant(), last_heartbeat=heartbeat, **fields)
    job = None
    if not no_job:
        job = UpdateJob.objects.create(
            node=node,
            release=rollout.release,
            rollout=rollout,
            state=UpdateJob.State.DONE if finished else UpdateJob.State.APPLYING,
            finished_at=finished,
        )
    position = RolloutNode.objects.filter(rollout=rollout).count()
    return RolloutNode.objects.create(
        rollout=rollout, node=node, position=position, job=job, state="DONE"
    )


def _rows(rollout: Rollout) -> list[RolloutNode]:
    return list(RolloutNode.objects.filter(rollout=rollout).select_related("job"))


def test_healthy_canaries_pass_and_report_the_worst_metrics(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=BAKE)
    fresh = T0 + timedelta(seconds=BAKE + 1)
    _row(rollout, "c1", heartbeat=fresh, error_rate=0.01, p99_latency_ms=120.0)
    _row(rollout, "c2", heartbeat=fresh, error_rate=0.03, p99_latency_ms=80.0)
    verdict = canary_gate(rollout, _rows(rollout), fresh)
    assert verdict == GateVerdict(True, "within thresholds", 0.03, 120.0, [], waiting=False)
    assert verdict.as_dict() == {
        "reason": "within thresholds",
        "error_rate": 0.03,
        "p99_ms": 120.0,
        "unhealthy": [],
    }


def test_metrics_exactly_at_the_thresholds_pass(release: Release) -> None:
    rollout = _rollout(release, max_error_rate=0.05, max_p99_ms=500)
    _row(rollout, "c1", heartbeat=T0 + timedelta(seconds=1), error_rate=0.05, p99_latency_ms=500)
    verdict = canary_gate(rollout, _rows(rollout), T0 + timedelta(seconds=1))
    assert verdict.passed is True
    assert verdict.reason == "within thresholds"


def test_every_breach_is_named_and_the_unhealthy_nodes_sorted(release: Release) -> None:
    rollout = _rollout(release, max_error_rate=0.05, max_p99_ms=500)
    fresh = T0 + timedelta(seconds=1)
    _row(rollout, "c3", heartbeat=fresh, error_rate=0.2, p99_latency_ms=900.0)
    # A node whose service reports unhealthy, and one the dashboard sees offline although its
    # last report said healthy: both count as unhealthy.
    _row(rollout, "c2", heartbeat=fresh, service_healthy=False)
    _row(rollout, "c1", heartbeat=fresh, status=Node.Status.OFFLINE)
    verdict = canary_gate(rollout, _rows(rollout), fresh)
    assert verdict.passed is False
    assert verdict.reason == (
        "error rate 20.0% above 5.0%; p99 latency 900 ms above 500 ms; unhealthy: c1, c2"
    )
    assert sorted(verdict.unhealthy) == ["c1", "c2"]
    assert (verdict.error_rate, verdict.p99_ms) == (0.2, 900.0)
    assert verdict.as_dict()["unhealthy"] == verdict.unhealthy


@pytest.mark.parametrize(
    "metrics",
    [{"service_healthy": False}, {"status": Node.Status.OFFLINE}, {"status": Node.Status.FAILED}],
    ids=["service unhealthy", "offline", "failed"],
)
def test_one_unhealthy_canary_fails_the_gate(release: Release, metrics: dict[str, Any]) -> None:
    rollout = _rollout(release)
    fresh = T0 + timedelta(seconds=1)
    _row(rollout, "ok", heartbeat=fresh, error_rate=0.0, p99_latency_ms=10.0)
    _row(rollout, "sick", heartbeat=fresh, error_rate=0.0, p99_latency_ms=10.0, **metrics)
    verdict = canary_gate(rollout, _rows(rollout), fresh)
    assert verdict == GateVerdict(False, "unhealthy: sick", 0.0, 10.0, ["sick"])


def test_nodes_without_metrics_pass_with_no_figures(release: Release) -> None:
    rollout = _rollout(release)
    _row(rollout, "c1", heartbeat=T0 + timedelta(seconds=1))
    verdict = canary_gate(rollout, _rows(rollout), T0 + timedelta(seconds=1))
    assert verdict == GateVerdict(True, "within thresholds", None, None, [])


def test_it_waits_for_a_heartbeat_after_the_update_plus_bake(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=BAKE)
    fresh_from = T0 + timedelta(seconds=BAKE)
    # A heartbeat exactly at the end of the bake is not after it: those metrics may still
    # be the old ones.
    _row(rollout, "c2", heartbeat=fresh_from, error_rate=0.0)
    _row(rollout, "c1", heartbeat=None)
    verdict = canary_gate(rollout, _rows(rollout), fresh_from + timedelta(seconds=5))
    assert verdict == GateVerdict(
        False,
        "waiting for metrics reported after the update from c2, c1",
        None,
        None,
        [],
        waiting=True,
    )


def test_a_canary_still_updating_is_not_waited_for_and_does_not_hide_the_others(
    release: Release,
) -> None:
    rollout = _rollout(release)
    # Listed first: a node whose job has not ended, and one with no job at all. Neither has
    # metrics to wait for, and neither must stop the gate from looking at the rest.
    _row(rollout, "busy", finished=None, heartbeat=None)
    _row(rollout, "unstarted", finished=None, heartbeat=None, no_job=True)
    _row(rollout, "quiet", heartbeat=None)
    verdict = canary_gate(rollout, _rows(rollout), T0 + timedelta(seconds=5))
    assert verdict.waiting is True
    assert verdict.reason == "waiting for metrics reported after the update from quiet"


def test_a_canary_silent_past_the_wait_fails_the_gate_by_name(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=BAKE)
    wait = fresh_metrics_wait(rollout)
    assert wait == timedelta(
        seconds=settings.THEMIS_NODE_OFFLINE_AFTER + rollout.opts.offline_grace
    )
    deadline = T0 + timedelta(seconds=BAKE) + wait
    _row(rollout, "c1", heartbeat=None)
    _row(rollout, "c2", heartbeat=T0)
    # At the deadline itself the gate still waits ...
    assert canary_gate(rollout, _rows(rollout), deadline).waiting is True
    # ... a moment later both silent nodes fail it.
    verdict = canary_gate(rollout, _rows(rollout), deadline + timedelta(microseconds=1))
    assert verdict == GateVerdict(
        False,
        f"no metrics reported after the update from c1, c2 within {int(wait.total_seconds())} s",
        None,
        None,
        ["c1", "c2"],
        waiting=False,
    )


def _completed(rollout: Rollout, stage: int, at: datetime, decision: str) -> None:
    made = StageDecision.objects.create(
        rollout=rollout, stage=stage, decision=decision, decided_by_label="system"
    )
    StageDecision.objects.filter(pk=made.pk).update(created_at=at)


def test_baking_lasts_the_bake_time_after_the_stage_completed(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=1)
    _completed(rollout, 0, T0, Decision.STAGE_COMPLETED)
    assert baking(rollout, 0, T0) is True
    assert baking(rollout, 0, T0 + timedelta(milliseconds=999)) is True
    assert baking(rollout, 0, T0 + timedelta(seconds=1)) is False


def test_no_bake_time_means_no_baking(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=0)
    _completed(rollout, 0, T0, Decision.STAGE_COMPLETED)
    assert baking(rollout, 0, T0) is False


def test_only_this_rollouts_completion_of_this_stage_starts_the_bake(release: Release) -> None:
    rollout = _rollout(release, bake_seconds=BAKE)
    other = _rollout(release, bake_seconds=BAKE)
    _completed(other, 0, T0, Decision.STAGE_COMPLETED)
    _completed(rollout, 1, T0, Decision.STAGE_COMPLETED)
    _completed(rollout, 0, T0, Decision.GATE_PASSED)
    assert baking(rollout, 0, T0 + timedelta(seconds=1)) is False
    assert baking(rollout, 1, T0 + timedelta(seconds=1)) is True


@pytest.mark.parametrize(
    ("rate", "p99", "expected"),
    [
        (None, None, []),
        (0.02, 250.0, []),  # at the limits: within them
        (0.0201, None, ["error rate 2.0% above 2.0%"]),
        (None, 250.4, ["p99 latency 250 ms above 250 ms"]),
        (0.5, 900.0, ["error rate 50.0% above 2.0%", "p99 latency 900 ms above 250 ms"]),
    ],
)
def test_metric_breaches_names_each_limit_broken(
    rate: float | None, p99: float | None, expected: list[str]
) -> None:
    gate = GateOptions(max_error_rate=0.02, max_p99_ms=250.0)
    assert metric_breaches(rate, p99, gate) == expected

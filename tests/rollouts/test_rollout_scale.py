"""A rollout's page, its poll and its drive cost the same number of queries for a small and a
large plan: nothing is read per plan row (counts come from GROUP BY, the table is a page)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tenants.models import Blackout, MaintenanceWindow, Tenant, UpdatePolicy
from tests.conftest import Fleet
from tests.factories import make_release, make_tenant
from tests.fakes import NullTransport, answer_queued_jobs, finish_queued_updates_in_bulk
from updates.jobs import services as jobs
from updates.models import Node, NodeCommand, Release, Rollout, RolloutNode, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.selectors import PLAN_PAGE_SIZE

pytestmark = pytest.mark.django_db

RN = RolloutNode.State
# Row states in turn: each page holds some of each, waiting ones of every tenant.
PATTERN = (RN.DONE, RN.WAITING, RN.PENDING, RN.FAILED, RN.RUNNING, RN.WAITING, RN.SKIPPED)


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _schedules(tenants: list[Tenant]) -> None:
    for tenant in tenants:
        MaintenanceWindow.objects.create(
            tenant=tenant, days="56", start_time=time(2), end_time=time(4), timezone="UTC"
        )
        UpdatePolicy.objects.create(tenant=tenant, auto_update=True)
        Blackout.objects.create(
            tenant=tenant,
            name="freeze",
            starts_at=datetime(2026, 12, 24, tzinfo=UTC),
            ends_at=datetime(2026, 12, 27, tzinfo=UTC),
        )
    Blackout.objects.create(
        name="fleet freeze",
        starts_at=datetime(2026, 12, 31, tzinfo=UTC),
        ends_at=datetime(2027, 1, 2, tzinfo=UTC),
    )


def _seed(size: int, tenants: list[Tenant], release: Release) -> Rollout:
    """A running canary of `size` nodes over four stages, rows in every state."""
    tag = f"s{size}"
    nodes = Node.objects.bulk_create(
        Node(
            node_id=f"{tag}-{i:04d}",
            hostname="h",
            tenant=tenants[i % len(tenants)],
            installed_version="1.6.0",
            status="online",
            error_rate=0.01 * (i % 3),
            p99_latency_ms=40.0 + i % 7,
        )
        for i in range(size)
    )
    rollout = Rollout.objects.create(
        release=release, strategy=Rollout.Strategy.CANARY, state=Rollout.State.RUNNING
    )
    states = [PATTERN[i % len(PATTERN)] for i in range(size)]
    job_states = {RN.WAITING: UpdateJob.State.WAITING_FOR_WINDOW, RN.RUNNING: "RUNNING"}
    created = UpdateJob.objects.bulk_create(
        UpdateJob(
            node=node,
            release=release,
            rollout=rollout,
            state=job_states.get(state, UpdateJob.State.DONE),
            wait_reason="outside the maintenance window" if state == RN.WAITING else "",
        )
        for node, state in zip(nodes, states, strict=True)
    )
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node=node,
            position=i,
            stage=i * 4 // size,
            state=state,
            job=None if state in (RN.PENDING, RN.SKIPPED) else job,
        )
        for i, (node, state, job) in enumerate(zip(nodes, states, created, strict=True))
    )
    return rollout


def _queries(client: Client, url: str, **headers: str) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, headers=headers)
    assert response.status_code == 200
    return len(queries), response.content.decode()


# A Wednesday: the tenants' Saturday and Sunday windows are shut, the freezes ahead; the page
# works its next window out from the clock, so a real one reads "open now" two days a week.
@pytest.mark.time_machine(datetime(2026, 12, 2, 12, tzinfo=UTC), tick=False)
@pytest.mark.parametrize("persona", ["operator", "admin_a"])
@pytest.mark.parametrize("query", ["", "?state=WAITING", "?page=2"])
def test_the_page_and_its_poll_cost_the_same_queries_for_20_and_400_nodes(
    personas: dict[str, Client], fleet: Fleet, persona: str, query: str
) -> None:
    tenants = [fleet.tenant_a, fleet.tenant_b, make_tenant(name="C", slug="c")]
    _schedules(tenants)
    release = make_release(version="1.7.0")
    small, large = _seed(20, tenants, release), _seed(400, tenants, release)
    client = personas[persona]
    counts = {}
    for rollout in (small, large):
        url = reverse("rollout_detail", args=[rollout.pk]) + query
        page, body = _queries(client, url)
        poll, partial = _queries(client, url, HX_Request="true")
        assert "next window: Sat 02:00" in body and partial.lstrip().startswith("<div")
        assert body.count("<tr data-node=") <= PLAN_PAGE_SIZE
        counts[rollout.pk] = (page, poll)
    assert counts[small.pk] == counts[large.pk]


def test_the_table_is_a_page_of_the_plan_filtered_by_state(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    tenants = [fleet.tenant_a, fleet.tenant_b]
    rollout = _seed(400, tenants, make_release(version="1.7.0"))
    url = reverse("rollout_detail", args=[rollout.pk])
    client = personas["operator"]
    first = client.get(url).content.decode()
    assert first.count("<tr data-node=") == PLAN_PAGE_SIZE
    assert 'data-node="s400-0000"' in first and 'data-node="s400-0100"' not in first
    assert "400 / 400" not in first and "page 1 of 4" in first
    assert 'data-filter="FAILED"' in first and "failed (57)" in first
    second = client.get(url + "?page=2").content.decode()
    assert 'data-node="s400-0100"' in second and 'data-node="s400-0000"' not in second
    # the poll asks for the same page of the table
    assert f'hx-get="{url}?page=2"' in second
    failed = client.get(url + "?state=FAILED").content.decode()
    rows = failed.count("<tr data-node=")
    assert rows == 57 == failed.count('data-state="FAILED"')
    # A page past the end shows the last one; junk shows the first.
    assert "page 4 of 4" in client.get(url + "?page=99").content.decode()
    assert "page 1 of 4" in client.get(url + "?page=x&state=nonsense").content.decode()


def test_a_tenant_admin_counts_only_their_rows(personas: dict[str, Client], fleet: Fleet) -> None:
    rollout = _seed(40, [fleet.tenant_a, fleet.tenant_b], make_release(version="1.7.0"))
    body = personas["admin_a"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    assert body.count("<tr data-node=") == 20
    assert "all (20)" in body and "20 nodes of other tenants" in body
    assert "s40-0001" not in body  # tenant B's


def _drive_queries(size: int) -> dict[tuple[tuple[str, int], ...], set[int]]:
    """Queries of each drive of a canary of `size` nodes (at most 5 updating at once),
    driven once per wave of finished jobs until it completes, by the steps it committed
    and the number of nodes it started."""
    tenant = make_tenant(name=f"T{size}", slug=f"t{size}")
    Node.objects.bulk_create(
        Node(
            node_id=f"d{size}-{i:04d}",
            hostname="h",
            tenant=tenant,
            installed_version="1.6.0",
            status="online",
            error_rate=0.001,
            p99_latency_ms=50,
            service_healthy=True,
        )
        for i in range(size)
    )
    release = make_release(version=f"1.7.{size}")
    stages = [{"fraction": f, "auto_promote": True} for f in (0.02, 0.1, 0.5, 1.0)]
    rollout = rollouts.rollout_create(
        release=release,
        strategy="canary",
        nodes=list(Node.objects.filter(tenant=tenant)),
        user=None,
        options={"stages": stages, "gate": {"automatic": True}, "max_parallel": 5},
    )
    rollouts.rollout_start(rollout=rollout, user=None)

    def heartbeat(job: UpdateJob) -> None:
        Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())

    steps: list[str] = []
    queries = [0]

    def count(execute: Callable[..., Any], *args: Any) -> Any:
        queries[0] += 1
        return execute(*args)

    ctx = coordinator.DriveContext(transport=NullTransport(), after_commit=steps.append)
    by_steps: dict[tuple[tuple[str, int], ...], set[int]] = {}
    for _ in range(4 * size):
        steps.clear()
        queries[0] = 0
        jobs_before = UpdateJob.objects.count()
        with connection.execute_wrapper(count):
            outcome = coordinator.rollout_drive(rollout.pk, ctx=ctx)
        # By what the drive did: its committed steps and the nodes it started.
        shape = Counter(steps) + Counter(jobs=UpdateJob.objects.count() - jobs_before)
        by_steps.setdefault(tuple(sorted(shape.items())), set()).add(queries[0])
        if outcome != coordinator.DriveOutcome.RUNNING:
            break
        answer_queued_jobs(on_done=heartbeat)
    assert Rollout.objects.get(pk=rollout.pk).state == Rollout.State.COMPLETED
    return by_steps


def test_a_drive_costs_the_same_queries_for_50_and_250_nodes() -> None:
    small, large = _drive_queries(50), _drive_queries(250)
    # A drive that syncs the five finished nodes and starts five more (in steps of 1, 2
    # and 2), one that completes a stage, the last: each costs the same at 50 and at 250.
    steady = (("jobs", 5), ("start_node", 3), ("sync", 1))
    assert steady in small and steady in large
    for steps in small.keys() & large.keys():
        # (a stage's drives differ among themselves: its decision, then its promotion)
        assert small[steps] == large[steps], steps


def test_a_stage_without_a_cap_starts_every_pending_node_read_in_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coordinator, "CANDIDATE_BATCH", 2)
    tenant = make_tenant(name="Batch", slug="batch")
    nodes = Node.objects.bulk_create(
        Node(node_id=f"batch-{i}", hostname="h", tenant=tenant, installed_version="1.6.0")
        for i in range(7)
    )
    rollout = rollouts.rollout_create(
        release=make_release(version="1.7.0"),
        strategy="rolling",
        nodes=nodes,
        user=None,
        options={"parallel": True},
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk, ctx=coordinator.DriveContext(transport=NullTransport()))
    started = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.RUNNING, RN.WAITING])
    assert started.count() == 7 == UpdateJob.objects.filter(rollout=rollout).count()


def _canary_of(tag: str, size: int, release: Release) -> tuple[Rollout, list[Node]]:
    tenant = make_tenant(name=tag, slug=tag)
    nodes = Node.objects.bulk_create(
        Node(
            node_id=f"{tag}-{i:03d}",
            hostname="h",
            tenant=tenant,
            installed_version="1.6.0",
            error_rate=0.001,
            p99_latency_ms=50,
            service_healthy=True,
        )
        for i in range(size)
    )
    rollout = rollouts.rollout_create(
        release=release,
        strategy="canary",
        nodes=nodes,
        user=None,
        options={
            "stages": [{"fraction": f, "auto_promote": True} for f in (0.1, 1.0)],
            "gate": {"automatic": True},
        },
    )
    return rollouts.rollout_start(rollout=rollout, user=None), nodes


def _seen_by_the_coordinator(rollout: Rollout) -> set[tuple[Any, ...]]:
    """What the coordinator and its gate read of a rollout's finished jobs."""
    return {
        (
            j.state,
            j.progress_percent,
            j.node.installed_version,
            j.node.status,
            j.node.last_heartbeat is not None
            and j.finished_at is not None
            and j.node.last_heartbeat > j.finished_at,
            *NodeCommand.objects.filter(job=j).values_list("state", flat=True),
        )
        for j in UpdateJob.objects.filter(rollout=rollout).select_related("node")
    }


def test_bulk_answers_leave_what_one_by_one_answers_leave_for_the_coordinator() -> None:
    release = make_release(version="1.7.0")
    ctx = coordinator.DriveContext(transport=NullTransport())

    def heartbeat(job: UpdateJob) -> None:
        # Stamped when the job has finished (a time read before could be earlier than its
        # finish on a slow machine): the heartbeat after the update the gate waits for.
        Node.objects.filter(pk=job.node_id).update(
            last_heartbeat=timezone.now() + timedelta(seconds=1)
        )

    one_by_one, _ = _canary_of("single", 20, release)
    coordinator.rollout_drive(one_by_one.pk, ctx=ctx)
    assert answer_queued_jobs(on_done=heartbeat) == 2
    bulk, _ = _canary_of("bulk", 20, release)
    coordinator.rollout_drive(bulk.pk, ctx=ctx)
    assert finish_queued_updates_in_bulk() == 2
    done = {("DONE", 100, "1.7.0", "online", True, "ACKED")}
    assert _seen_by_the_coordinator(bulk) == _seen_by_the_coordinator(one_by_one) == done
    # The next drives of each see its stage through (gate, promotion) and start the rest.
    for rollout in (one_by_one, bulk):
        for _ in range(3):
            coordinator.rollout_drive(rollout.pk, ctx=ctx)
    counts = [
        Counter(RolloutNode.objects.filter(rollout=r).values_list("state", flat=True))
        for r in (one_by_one, bulk)
    ]
    assert counts[0] == counts[1] == {"DONE": 2, "RUNNING": 18}


def test_a_canary_answered_in_bulk_completes() -> None:
    rollout, nodes = _canary_of("sim", 60, make_release(version="1.7.0"))
    ctx = coordinator.DriveContext(transport=NullTransport())
    for _ in range(10):
        if coordinator.rollout_drive(rollout.pk, ctx=ctx) != coordinator.DriveOutcome.RUNNING:
            break
        finish_queued_updates_in_bulk()
    assert Rollout.objects.get(pk=rollout.pk).state == Rollout.State.COMPLETED
    versions = Node.objects.filter(pk__in=[n.pk for n in nodes]).values_list(
        "installed_version", flat=True
    )
    assert set(versions) == {"1.7.0"}
    assert UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 60

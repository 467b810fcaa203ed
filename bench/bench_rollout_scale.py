"""A rollout's page and its drive at fleet scale (plain script; temporary SQLite database, or
a throwaway PostgreSQL server with --postgres):

    .venv/bin/python bench/bench_rollout_scale.py [--nodes 10000] [--baseline-nodes 100]
        [--runs 20] [--drive-nodes N] [--debounced-only] [--bulk-answers] [--postgres]

For a canary of N nodes (and of the baseline size), seeded with bulk_create over 20 tenants
with maintenance windows, blackouts and policies:

- the rollout's page and its poll (htmx partial) through Django's test Client as an
  operator, on a plan caught mid-rollout (rows in every state, a seventh of them waiting
  for their window): p50/p95, queries, KB;
- the coordinator: a fresh canary (stages 1, 5, 25, 100 %) driven to completion by
  `rollout_drive`, once per finished job (as the wake-ups do) and once per wave of finished
  jobs (debounced), with agents simulated through the coordinator's transport seam
  (NullTransport; the jobs are answered in the database, one by one or with --bulk-answers
  in a few set-wise statements per wave). Only the drives are timed: ms and queries per node.

Prints the N / baseline ratios: the page's queries should not change (1.00) and the
coordinator's cost per node should stay flat. Aims: page p95 <= 150 ms, debounced drive
<= 5 ms per node (exit status 1 when missed).
Baseline before plan indexes, GROUP BY counts and a paged table (10,000 nodes): page p95
1,864 ms, 91 queries, 2.3 MB; one drive per finished job 21.6 ms/node. Before starts in
batches and the bulk relay: debounced drive 10-16 ms/node, 16-19 queries/node.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.django_env import start_django  # noqa: E402
from tests import postgres  # noqa: E402

AIM_MS = 150.0
DRIVE_AIM_MS = 5.0
TENANTS = 20
STAGES = (0.01, 0.05, 0.25, 1.0)


@dataclass(frozen=True)
class PageResult:
    p50_ms: float
    p95_ms: float
    queries: int
    kb: float


@dataclass(frozen=True)
class DriveResult:
    drives: int
    ms_per_node: float
    queries_per_node: float


def setup_django(tmp: Path, database_url: str) -> None:
    start_django(database_url, tmp, ALLOWED_HOSTS="testserver")
    from themis_dashboard.celery import app

    # Wake-ups and notifications go to an in-memory broker: the bench drives itself.
    app.conf.update(broker_url="memory://")


def _tenants() -> list[Any]:
    return with_calendars(_new_tenants())


def _new_tenants() -> list[Any]:
    from tenants.models import Tenant

    return Tenant.objects.bulk_create(
        Tenant(name=f"tenant {i:02d}", slug=f"tenant-{i:02d}") for i in range(TENANTS)
    )


def with_calendars(tenants: list[Any]) -> list[Any]:
    """Each tenant a maintenance window, a policy and a blackout (the rollout page works
    out when each waiting node may go)."""
    from tenants.models import Blackout, MaintenanceWindow, UpdatePolicy

    MaintenanceWindow.objects.bulk_create(
        MaintenanceWindow(
            tenant=t, days="56", start_time=clock(2), end_time=clock(4), timezone="Europe/Berlin"
        )
        for t in tenants
    )
    UpdatePolicy.objects.bulk_create(UpdatePolicy(tenant=t) for t in tenants)
    Blackout.objects.bulk_create(
        Blackout(
            tenant=t,
            name="year end",
            starts_at=datetime(2026, 12, 24, tzinfo=UTC),
            ends_at=datetime(2027, 1, 2, tzinfo=UTC),
        )
        for t in tenants
    )
    return tenants


def _nodes(tag: str, count: int, tenants: list[Any]) -> list[Any]:
    from updates.models import Node

    return Node.objects.bulk_create(
        Node(
            node_id=f"{tag}-{i:05d}",
            hostname=f"{tag}-{i:05d}.example",
            tenant=tenants[i % len(tenants)],
            installed_version="1.6.0",
            status="online",
            error_rate=0.001 * (i % 5),
            p99_latency_ms=40.0 + i % 30,
            service_healthy=True,
        )
        for i in range(count)
    )


def seed_page_rollout(count: int, tenants: list[Any], nodes: list[Any] | None = None) -> int:
    """A canary caught mid-rollout: stage 1 to 3 done or failed, the last stage running,
    waiting for its window, or pending. Over `nodes` (new ones when None)."""
    from updates.models import Release, Rollout, RolloutNode, UpdateJob

    rn = RolloutNode.State
    release = Release.objects.create(
        version=f"1.7.{count}", sha256="0" * 64, artifact="x.tar", state="published"
    )
    nodes = nodes if nodes is not None else _nodes(f"p{count}", count, tenants)
    rollout = Rollout.objects.create(
        release=release,
        strategy=Rollout.Strategy.CANARY,
        state=Rollout.State.RUNNING,
        current_stage=3,
        options={"stages": [{"fraction": f, "auto_promote": True} for f in STAGES]},
    )
    bounds = [int(count * f) for f in STAGES]
    stage_of = [next(s for s, b in enumerate(bounds) if i < max(b, 1)) for i in range(count)]
    states = []
    for i, stage in enumerate(stage_of):
        if stage < 3:
            states.append(rn.FAILED if i % 97 == 0 else rn.DONE)
        else:
            states.append((rn.DONE, rn.RUNNING, rn.WAITING, rn.PENDING, rn.PENDING)[i % 5])
    job_state = {
        rn.DONE: UpdateJob.State.DONE,
        rn.FAILED: UpdateJob.State.FAILED,
        rn.RUNNING: "RUNNING",
        rn.WAITING: UpdateJob.State.WAITING_FOR_WINDOW,
    }
    with_job = [(n, s) for n, s in zip(nodes, states, strict=True) if s in job_state]
    jobs = UpdateJob.objects.bulk_create(
        UpdateJob(
            node=node,
            release=release,
            rollout=rollout,
            state=job_state[state],
            wait_reason="outside the maintenance window" if state == rn.WAITING else "",
        )
        for node, state in with_job
    )
    job_of = {job.node_id: job for job in jobs}
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node=node,
            position=i,
            stage=stage_of[i],
            state=states[i],
            job=job_of.get(node.pk),
            version_before="1.6.0",
        )
        for i, node in enumerate(nodes)
    )
    return rollout.pk


def time_page(rollout_id: int, runs: int, *, poll: bool) -> PageResult:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    client = Client()
    client.force_login(User.objects.get(username="operator"))
    url = reverse("rollout_detail", args=[rollout_id])
    headers = {"HX-Request": "true"} if poll else {}
    client.get(url, headers=headers)  # warm caches
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        response = client.get(url, headers=headers)
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, response.status_code
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, headers=headers)
    p95 = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
    return PageResult(statistics.median(times), p95, len(queries), len(response.content) / 1024)


def time_drives(
    count: int, tenants: list[Any], *, debounced: bool, bulk_answers: bool = False
) -> DriveResult:
    from django.db import connection
    from django.utils import timezone

    from tenants.models import Tenant
    from tests.fakes import NullTransport, answer_queued_jobs, finish_queued_updates_in_bulk
    from updates.models import Node, Release, Rollout, UpdateJob
    from updates.rollouts import coordinator
    from updates.rollouts import services as rollouts

    tag = f"d{count}{'w' if debounced else 'e'}"
    # Tenants without windows: every job starts at once (the page's tenants have windows).
    free = Tenant.objects.bulk_create(
        Tenant(name=f"{tag} {i}", slug=f"{tag}-{i}") for i in range(len(tenants))
    )
    nodes = _nodes(tag, count, free)
    release = Release.objects.create(
        version=f"1.8.{count}{int(debounced)}", sha256="0" * 64, artifact="x.tar"
    )
    rollout = rollouts.rollout_create(
        release=release,
        strategy="canary",
        nodes=nodes,
        user=None,
        options={
            "stages": [{"fraction": f, "auto_promote": True} for f in STAGES],
            "gate": {"automatic": True},
        },
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    spent, queries, drives = 0.0, 0, 0

    def count_query(execute: Callable[..., Any], *args: Any) -> Any:
        nonlocal queries
        queries += 1
        return execute(*args)

    def drive() -> None:
        nonlocal spent, drives
        with connection.execute_wrapper(count_query):
            began = time.perf_counter()
            coordinator.rollout_drive(
                rollout.pk, ctx=coordinator.DriveContext(transport=NullTransport())
            )
            spent += time.perf_counter() - began
        drives += 1

    def heartbeat(job: UpdateJob) -> None:
        # The node's first heartbeat after its update: the gate counts only those metrics.
        Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())

    def heartbeat_and_drive(job: UpdateJob) -> None:
        heartbeat(job)
        drive()

    drive()
    while Rollout.objects.get(pk=rollout.pk).state == Rollout.State.RUNNING:
        if debounced:
            if bulk_answers:
                finish_queued_updates_in_bulk()
            else:
                answer_queued_jobs(on_done=heartbeat)
            drive()
        elif not answer_queued_jobs(on_done=heartbeat_and_drive):
            drive()
    state = Rollout.objects.get(pk=rollout.pk).state
    assert state == Rollout.State.COMPLETED, state
    return DriveResult(drives, 1000 * spent / count, queries / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--baseline-nodes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--drive-nodes", type=int, default=0, help="the drive's large size (default: --nodes)"
    )
    parser.add_argument(
        "--debounced-only",
        action="store_true",
        help="drive only as the coordinator does (debounced wake-ups): for very large canaries",
    )
    parser.add_argument(
        "--postgres", action="store_true", help="a throwaway PostgreSQL server, not SQLite"
    )
    parser.add_argument(
        "--bulk-answers",
        action="store_true",
        help="simulated agents answer each wave in a few set-wise statements "
        "(tests.fakes.finish_queued_updates_in_bulk) instead of one by one: for 100,000 nodes",
    )
    args = parser.parse_args()
    modes = (True,) if args.debounced_only else (False, True)
    sizes = (args.baseline_nodes, args.nodes)
    drive_sizes = (args.baseline_nodes, args.drive_nodes or args.nodes)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp}/bench.sqlite3"
        if args.postgres:
            server = stack.enter_context(postgres.postgres_server(settings={}))
            url = server.create_database("bench_rollout_scale")
        setup_django(Path(tmp), url)
        from django.contrib.auth.models import User
        from django.test.utils import override_settings

        User.objects.create_user("operator", is_superuser=True)
        tenants = _tenants()
        pages: dict[int, tuple[PageResult, PageResult]] = {}
        drives: dict[tuple[int, bool], DriveResult] = {}
        with override_settings(DEBUG=False):
            for size in sizes:
                began = time.perf_counter()
                rollout_id = seed_page_rollout(size, tenants)
                print(f"seeded a {size:,}-node rollout in {time.perf_counter() - began:.1f} s")
                pages[size] = (
                    time_page(rollout_id, args.runs, poll=False),
                    time_page(rollout_id, args.runs, poll=True),
                )
            for size in drive_sizes:
                for debounced in modes:
                    began = time.perf_counter()
                    drives[size, debounced] = time_drives(
                        size, tenants, debounced=debounced, bulk_answers=args.bulk_answers
                    )
                    print(f"drove a {size:,}-node canary in {time.perf_counter() - began:.1f} s")
    print(f"{'rollout page':28} {'p50 ms':>8} {'p95 ms':>8} {'queries':>8} {'KB':>8}")
    for size, (page, poll) in pages.items():
        for name, r in ((f"page, {size:,} nodes", page), (f"poll, {size:,} nodes", poll)):
            print(f"{name:28} {r.p50_ms:8.1f} {r.p95_ms:8.1f} {r.queries:8d} {r.kb:8.1f}")
    small, large = (pages[s] for s in sizes)
    for i, name in enumerate(("page", "poll")):
        print(
            f"{name} {sizes[1]:,}/{sizes[0]:,}: p95 ratio {large[i].p95_ms / small[i].p95_ms:.2f},"
            f" queries ratio {large[i].queries / small[i].queries:.2f}"
        )
    for (size, debounced), d in drives.items():
        mode = "debounced" if debounced else "one drive per finished job"
        print(
            f"drive, {size:>6,} nodes ({mode}): {d.drives} drives, {d.ms_per_node:.2f} ms/node,"
            f" {d.queries_per_node:.1f} queries/node"
        )
    for debounced in modes:
        base, big = drives[drive_sizes[0], debounced], drives[drive_sizes[1], debounced]
        print(
            f"drive {drive_sizes[1]:,}/{drive_sizes[0]:,} per node"
            f" ({'debounced' if debounced else 'per finished job'}):"
            f" time ratio {big.ms_per_node / base.ms_per_node:.2f},"
            f" queries ratio {big.queries_per_node / base.queries_per_node:.2f} (1.0 = flat)"
        )
    worst = max(r.p95_ms for pair in pages.values() for r in pair)
    # The aim is the large canary's: a small one's few drives carry fixed costs (gate, stage
    # decisions) over few nodes.
    slowest_drive = max(
        d.ms_per_node
        for (size, debounced), d in drives.items()
        if debounced and size == drive_sizes[1]
    )
    print(f"aims: page p95 <= {AIM_MS:.0f} ms, debounced drive <= {DRIVE_AIM_MS:.0f} ms/node")
    return 0 if worst <= AIM_MS and slowest_drive <= DRIVE_AIM_MS else 1


if __name__ == "__main__":
    sys.exit(main())

"""Coordinator overhead: a canary over N nodes with simulated agents that
answer instantly (plain script, temporary SQLite database):

    .venv/bin/python bench/bench_coordinator.py [--nodes 1000]

Measures only the coordinator's own work (`rollout_drive`): wall time and SQL
queries per node, as in production where every finished job wakes one drive.
Aim: <= 5 ms and O(1) queries per node. The baseline ratio compares a 1,000-
node run with a 100-node run: per-node cost should not grow with the fleet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup_django(tmp: Path) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "themis_dashboard.settings.base"
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ["THEMIS_VAR_DIR"] = str(tmp)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from themis_dashboard.celery import app

    # Wake-ups and notifications go to an in-memory broker: this bench drives
    # the rollout itself, once per finished job, as the wake-ups would.
    app.conf.update(broker_url="memory://")


class BenchResult(TypedDict):
    nodes: int
    mode: str
    drives: int
    ms_per_node: float
    queries_per_node: float
    total_s: float


def run(n_nodes: int, *, debounced: bool) -> BenchResult:
    from django.db import connection
    from django.utils import timezone

    from tenants.models import Tenant
    from tests.fakes import NullTransport, answer_queued_jobs
    from updates.models import Node, Release, Rollout, UpdateJob
    from updates.rollouts import coordinator
    from updates.rollouts import services as rollouts

    tag = f"{n_nodes}-{'d' if debounced else 'u'}"
    tenant = Tenant.objects.create(name=f"bench-{tag}", slug=f"bench-{tag}")
    Node.objects.bulk_create(
        Node(
            node_id=f"b{tag}-{i:05d}",
            hostname="h",
            tenant=tenant,
            installed_version="1.6.0",
            status="online",
            error_rate=0.001,
            p99_latency_ms=50,
            service_healthy=True,
        )
        for i in range(n_nodes)
    )
    release = Release.objects.create(
        version=f"1.7.{n_nodes}{int(debounced)}", sha256="0" * 64, artifact="x.tar"
    )
    nodes = list(Node.objects.filter(tenant=tenant))
    stages = [{"fraction": f, "auto_promote": True} for f in (0.01, 0.05, 0.25, 1.0)]
    rollout = rollouts.rollout_create(
        release=release,
        strategy="canary",
        nodes=nodes,
        user=None,
        options={"stages": stages, "gate": {"automatic": True}},
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    drive_seconds, drive_queries, drives = 0.0, 0, 0

    def drive() -> None:
        nonlocal drive_seconds, drive_queries, drives
        counted = [0]

        def count(
            execute: Callable[[str, Any, bool, dict[str, Any]], Any],
            sql: str,
            params: Any,
            many: bool,
            context: dict[str, Any],
        ) -> Any:
            counted[0] += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(count):
            start = time.perf_counter()
            coordinator.rollout_drive(
                rollout.pk, ctx=coordinator.DriveContext(transport=NullTransport())
            )
            drive_seconds += time.perf_counter() - start
        drive_queries += counted[0]
        drives += 1

    def heartbeat(job: UpdateJob) -> None:
        # The node's first heartbeat after its update: the gate counts only those metrics.
        Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())

    def heartbeat_and_drive(job: UpdateJob) -> None:
        heartbeat(job)
        drive()

    drive()
    while Rollout.objects.get(pk=rollout.pk).state == "RUNNING":
        if debounced:
            # agents answering at once: their finishes share one wake-up
            answer_queued_jobs(on_done=heartbeat)
            drive()
        elif not answer_queued_jobs(on_done=heartbeat_and_drive):
            drive()  # one wake-up per finished job (no debounce)
    state = Rollout.objects.get(pk=rollout.pk).state
    assert state == "COMPLETED", state
    assert UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == n_nodes
    return {
        "nodes": n_nodes,
        "mode": "debounced" if debounced else "one drive per finish",
        "drives": drives,
        "ms_per_node": 1000 * drive_seconds / n_nodes,
        "queries_per_node": drive_queries / n_nodes,
        "total_s": drive_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--baseline-nodes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup_django(Path(tmp))
        from django.test.utils import override_settings

        with override_settings(DEBUG=False):
            base = run(args.baseline_nodes, debounced=False)
            big = run(args.nodes, debounced=False)
            wave = run(args.nodes, debounced=True)
    for result in (base, big, wave):
        print(
            f"canary over {result['nodes']:>5} nodes ({result['mode']}): "
            f"{result['drives']} drives, "
            f"{result['ms_per_node']:.2f} ms/node, {result['queries_per_node']:.1f} queries/node, "
            f"coordinator total {result['total_s']:.2f} s"
        )
    print(
        f"per-node time ratio {args.nodes} vs {args.baseline_nodes} nodes: "
        f"{big['ms_per_node'] / base['ms_per_node']:.2f} (1.0 = flat; aim <= 5 ms/node)"
    )
    print(f"per-node query ratio: {big['queries_per_node'] / base['queries_per_node']:.2f}")
    print(
        f"debounced wake-ups vs one per finish at {args.nodes} nodes: "
        f"{wave['ms_per_node'] / big['ms_per_node']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

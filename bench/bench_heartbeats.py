"""Heartbeat ingestion at fleet scale (plain script; temporary SQLite database, private Redis):

    .venv/bin/python bench/bench_heartbeats.py [--nodes 10000] [--rounds 2] [--postgres]

Seeds N online nodes (each with its components and restore points, as a real agent reports
them), signs `rounds` heartbeats per node with each node's own key, and sends them as the
agent does (a Celery message on the `heartbeats` queue). Then times, end to end (from the
moment the queue is released to the moment every node's row holds its newest heartbeat):
one ingester process (`manage.py ingest_heartbeats`), then two sharing the queue.
The one-by-one path (the task every heartbeat used to go through, called in-process, so
without Celery's own cost) is timed on a sample for comparison.
Aim: 2,000 heartbeats/s per process (10,000 nodes every 5 s).
Baseline (one Celery task per heartbeat, one coordinator process): 241/s on SQLite, 109/s on
PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.django_env import start_django  # noqa: E402
from tests import postgres, procs  # noqa: E402

AIM_PER_SECOND = 2000.0
BASELINE = {"sqlite": 241.0, "postgresql": 109.0}
HOLD = "heartbeats.hold"
COMPONENTS = [
    {"product": "themisdb", "version": "1.7.1"},
    {"product": "themis-storage", "version": "1.3.0"},
    {"product": "themis-query", "version": "1.4.5"},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2, help="heartbeats per node per run")
    parser.add_argument("--sample", type=int, default=1000, help="one-by-one sample size")
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        url = f"sqlite:///{tmp / 'bench.sqlite3'}"
        if args.postgres:
            server = stack.enter_context(postgres.postgres_server(settings={}))
            url = server.create_database("bench_heartbeats")
        redis_url = stack.enter_context(procs.redis_server(tmp))
        start_django(url, tmp, REDIS_URL=redis_url, THEMIS_HEARTBEAT_INGESTER="0")
        from django.db import connection

        keys = _seed(args.nodes)
        vendor = connection.vendor
        one_by_one = _one_by_one(keys[: args.sample])
        print(f"{vendor}: {args.nodes:,} nodes; one by one (in-process): {one_by_one:,.0f}/s")
        seq = 1
        rates = {}
        for processes in (1, 2):
            _send(keys, first_seq=seq + 1, rounds=args.rounds)
            seq += args.rounds
            connection.close()
            rates[processes] = _ingest(processes, args.nodes, seq, tmp)
            total = args.nodes * args.rounds
            print(
                f"{processes} ingester process(es): {total:,} heartbeats, "
                f"{rates[processes]:,.0f}/s; x{rates[processes] / BASELINE[vendor]:.1f} the "
                f"baseline ({BASELINE[vendor]:.0f}/s), x{rates[processes] / one_by_one:.1f} one by "
                f"one, x{rates[processes] / AIM_PER_SECOND:.2f} the aim ({AIM_PER_SECOND:.0f}/s)"
            )
        print(f"2 processes / 1 process: x{rates[2] / rates[1]:.2f}")
        connection.close()
        return 0 if rates[1] >= AIM_PER_SECOND else 1


def _payload(version: str = "1.7.1") -> dict[str, Any]:
    return {
        "installed_version": version,
        "raft_role": "follower",
        "disk_free_bytes": 400 * 2**30,
        "disk_total_bytes": 1000 * 2**30,
        "memory_available_bytes": 12 * 2**30,
        "load_1m": 0.42,
        "restore_points": [
            {"id": "20261201T000000Z-1.7.0", "version": "1.7.0", "bytes": 2**30},
            {"id": "20261202T000000Z-1.7.1", "version": "1.7.1", "bytes": 2**30},
        ],
        "restore_points_bytes": 2 * 2**30,
        "error_rate": 0.001,
        "p99_latency_ms": 12.5,
        "service_healthy": True,
        "components": COMPONENTS,
    }


def _seed(n_nodes: int) -> list[tuple[str, bytes]]:
    from django.db import transaction
    from django.utils import timezone

    from tenants.models import Tenant
    from updates.models import Node, NodeComponent

    now = timezone.now()
    with transaction.atomic():
        tenant = Tenant.objects.create(name="Tenant", slug="tenant")
        nodes = Node.objects.bulk_create(
            (
                Node(
                    node_id=f"node-{i:05d}",
                    hostname=f"db{i}.example",
                    tenant=tenant,
                    status=Node.Status.ONLINE,
                    installed_version="1.7.1",
                    last_heartbeat=now,
                )
                for i in range(n_nodes)
            ),
            batch_size=2000,
        )
        NodeComponent.objects.bulk_create(
            (
                NodeComponent(node=n, product=c["product"], version=c["version"], updated_at=now)
                for n in nodes
                for c in COMPONENTS
            ),
            batch_size=5000,
        )
    return [(n.node_id, bytes.fromhex(n.agent_key)) for n in nodes]


def _one_by_one(sample: list[tuple[str, bytes]]) -> float:
    from updates.engine.reports import ReportType, sign_report
    from updates.fleet.tasks import record_heartbeat

    envelopes = [
        sign_report(key, ReportType.HEARTBEAT, {"node_id": n, **_payload()}, seq=1)
        for n, key in sample
    ]
    started = time.perf_counter()
    for envelope in envelopes:
        record_heartbeat(envelope=envelope)
    return len(envelopes) / (time.perf_counter() - started)


def _send(keys: list[tuple[str, bytes]], *, first_seq: int, rounds: int) -> None:
    """Every node's heartbeats, as the agent sends them, held aside until the clock starts."""
    import redis
    from django.conf import settings

    from themis_dashboard.celery import app
    from updates.engine.reports import HEARTBEAT_QUEUE, ReportType, sign_report
    from updates.taskqueue import TaskName

    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for seq in range(first_seq, first_seq + rounds):
            for node_id, key in keys:
                envelope = sign_report(
                    key, ReportType.HEARTBEAT, {"node_id": node_id, **_payload()}, seq=seq
                )
                app.send_task(
                    str(TaskName.RECORD_HEARTBEAT),
                    kwargs={"envelope": envelope},
                    queue=HEARTBEAT_QUEUE,
                    producer=producer,
                )
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.rename(HEARTBEAT_QUEUE, HOLD)
    print(f"  sent {len(keys) * rounds:,} heartbeats in {time.perf_counter() - started:.1f} s")


def _ingest(processes: int, n_nodes: int, newest_seq: int, tmp: Path) -> float:
    import redis
    from django.conf import settings
    from django.db import connection

    from updates.engine.reports import HEARTBEAT_QUEUE
    from updates.models import Node

    client = redis.Redis.from_url(settings.REDIS_URL)
    ingesters = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "ingest_heartbeats"],
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=(tmp / f"ingester-{processes}-{i}.log").open("w"),
            text=True,
        )
        for i in range(processes)
    ]
    time.sleep(4)  # Django's start-up is not what is measured
    started = time.perf_counter()
    client.rename(HOLD, HEARTBEAT_QUEUE)
    deadline = started + 600
    while time.perf_counter() < deadline:
        done = Node.objects.filter(report_sequence__gte=newest_seq).count()
        if done == n_nodes and not client.llen(HEARTBEAT_QUEUE):
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    connection.close()
    for ingester in ingesters:
        ingester.terminate()
    received = 0
    for ingester in ingesters:
        out, _ = ingester.communicate(timeout=30)
        print(f"  ingester: {out.strip()} ({elapsed:.2f} s)")
        received += int(out.split()[0])
    return received / elapsed


if __name__ == "__main__":
    sys.exit(main())

"""The dashboard at fleet scale, served as it is deployed (plain script):

    .venv/bin/python bench/bench_scale.py [--nodes 10000] [--baseline-nodes 100]
        [--events-per-node 100] [--jobs-per-node 5] [--runs 20]
        [--database sqlite|postgres|both] [--no-heartbeats]

For each database and each fleet size, a fresh database seeded as the fleet of the scale
issue (50 tenants, 2,000 clusters, N nodes with restore points, 100 events and 5 finished jobs
per node, and a canary over every node caught mid-rollout), a real server on it (gunicorn,
3 workers, DEBUG off), and an operator's browser (logged in through the login form, asking
for gzip) asking each page `runs` times: p95 latency and bytes on the wire; the queries of
each page are counted once in-process. Then heartbeats/s end to end through one and two
ingester processes (bench/bench_heartbeats.py at N nodes). Prints the table with the
N / baseline ratio.

Aims at 10,000 nodes: every page p95 <= 150 ms with the same queries as at 100; heartbeats
>= 2,500/s with one process.
Baseline (before this work, SQLite, 10,000 nodes): fleet 1,399 ms, events 2,147 ms, events
filtered 2,004 ms, rollout detail 1,864 ms, tenant list 99 ms; heartbeats 241/s (PostgreSQL:
fleet 1,242, events 1,710, rollout 1,664 ms; heartbeats 109/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.django_env import start_django  # noqa: E402
from tests import postgres  # noqa: E402

AIM_MS = 150.0
WORKERS = 3
WARM_UP = 2 * WORKERS
PASSWORD = "bench-" + os.urandom(6).hex()
POLL_RE = re.compile(r'id="fleet-poll" hx-get="([^"]+)"')
HEARTBEATS_RE = re.compile(r"^(\d) ingester process\(es\): [\d,]+ heartbeats, ([\d,]+)/s", re.M)


@dataclass(frozen=True)
class PageFigures:
    p50_ms: float
    p95_ms: float
    queries: int
    wire_kb: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--baseline-nodes", type=int, default=100)
    parser.add_argument("--events-per-node", type=int, default=100)
    parser.add_argument("--jobs-per-node", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--no-heartbeats", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("DATABASE_URL", "NODES", "OUT"), help="inner")
    args = parser.parse_args()
    if args.one:
        url, nodes, out = args.one
        return _measure_one(url, int(nodes), Path(out), args)
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    failed = False
    for database in databases:
        failed |= _measure_database(database, args)
    return 1 if failed else 0


def _measure_database(database: str, args: argparse.Namespace) -> bool:
    sizes = (args.baseline_nodes, args.nodes)
    figures: dict[int, dict[str, PageFigures]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        server = stack.enter_context(postgres.postgres_server({})) if database != "sqlite" else None
        for size in sizes:
            url = (
                server.create_database(f"scale{size}")
                if server is not None
                else f"sqlite:///{tmp / f'scale{size}.sqlite3'}"
            )
            out = tmp / f"figures-{size}.json"
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--one", url, str(size), str(out), "--runs",
                 str(args.runs), "--events-per-node", str(args.events_per_node),
                 "--jobs-per-node", str(args.jobs_per_node)],
                check=True,
            )  # fmt: skip
            print(f"  {database}, {size:,} nodes measured in {time.perf_counter() - started:.0f} s")
            figures[size] = {k: PageFigures(**v) for k, v in json.loads(out.read_text()).items()}
    heartbeats = {} if args.no_heartbeats else _heartbeats(database, args.nodes)
    return _print_table(database, sizes, figures, heartbeats)


def _print_table(
    database: str,
    sizes: tuple[int, int],
    figures: dict[int, dict[str, PageFigures]],
    heartbeats: dict[int, float],
) -> bool:
    small, large = sizes
    print(f"\n{database}: {small:,} vs {large:,} nodes")
    header = (
        f"{'page':34} {'p95 ' + str(small):>10} {'p95 ' + str(large):>11} {'ratio':>6} "
        f"{'p50 ' + str(large):>11} {'queries':>9} {'KB wire':>8}"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    for page, big in figures[large].items():
        little = figures[small][page]
        worst = max(worst, big.p95_ms)
        print(
            f"{page:34} {little.p95_ms:8.1f}ms {big.p95_ms:9.1f}ms "
            f"{big.p95_ms / little.p95_ms:6.2f} {big.p50_ms:9.1f}ms "
            f"{little.queries:4d}→{big.queries:<4d} {big.wire_kb:8.1f}"
        )
    for processes, rate in sorted(heartbeats.items()):
        print(f"heartbeats/s, {processes} ingester process(es) at {large:,} nodes: {rate:,.0f}")
    ok = worst <= AIM_MS and heartbeats.get(1, 2500.0) >= 2500.0
    print(f"worst p95 {worst:.1f} ms (aim {AIM_MS:.0f} ms): {'ok' if ok else 'MISSED'}")
    return not ok


def _heartbeats(database: str, nodes: int) -> dict[int, float]:
    argv = [sys.executable, str(ROOT / "bench" / "bench_heartbeats.py"), "--nodes", str(nodes)]
    argv += ["--sample", "200"] + (["--postgres"] if database != "sqlite" else [])
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = {int(p): float(r.replace(",", "")) for p, r in HEARTBEATS_RE.findall(result.stdout)}
    if not found:
        print(result.stdout[-2000:], result.stderr[-2000:])
    return found


# ------------------------------------------------------------------ one database, one size


def _measure_one(url: str, nodes: int, out: Path, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        start_django(url, tmp_name, ALLOWED_HOSTS="testserver,127.0.0.1", DEBUG="false")
        from django.db import connection

        started = time.perf_counter()
        pages = _seed(nodes, args.events_per_node, args.jobs_per_node)
        print(f"  seeded {nodes:,} nodes in {time.perf_counter() - started:.0f} s")
        connection.close()
        figures = _time_pages(pages, args.runs)
        out.write_text(json.dumps({k: asdict(v) for k, v in figures.items()}))
        connection.close()
    return 0


def _seed(nodes: int, events_per_node: int, jobs_per_node: int) -> dict[str, tuple[str, bool]]:
    """Seed the fleet; returns each page's path and whether it is an htmx poll."""
    from django.contrib.auth.models import User
    from django.db import connection, transaction

    from bench import bench_events, bench_fleet, bench_rollout_scale
    from tenants.models import Tenant
    from updates.models import Node, Release, UpdateJob

    bench_fleet._seed(nodes)
    operator = User.objects.get(username="operator")
    operator.set_password(PASSWORD)
    operator.save()
    bench_events.seed_events(nodes * events_per_node, random.Random(20))
    tenants = bench_rollout_scale.with_calendars(list(Tenant.objects.order_by("pk")))
    fleet = list(Node.objects.order_by("pk"))
    old = Release.objects.create(version="1.6.1", sha256="1" * 64, artifact="y.tar")
    done = datetime.now(UTC) - timedelta(days=30)
    with transaction.atomic():
        UpdateJob.objects.bulk_create(
            (
                UpdateJob(node=node, release=old, state=UpdateJob.State.DONE, finished_at=done)
                for node in fleet
                for _ in range(jobs_per_node)
            ),
            batch_size=5000,
        )
    rollout = bench_rollout_scale.seed_page_rollout(nodes, tenants, nodes=fleet)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    node = fleet[len(fleet) // 2].node_id
    return {
        "fleet": ("/", False),
        "fleet poll (idle)": ("", True),
        "events, first page": ("/events/", False),
        "events, by node and verb prefix": (f"/events/?node={node}&verb=job.", False),
        "rollout detail (canary, every node)": (f"/rollouts/{rollout}/", False),
        "rollout detail poll": (f"/rollouts/{rollout}/", True),
        "tenant list": ("/tenants/", False),
    }


def _time_pages(pages: dict[str, tuple[str, bool]], runs: int) -> dict[str, PageFigures]:
    import requests

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "themis_dashboard.wsgi", "-w", str(WORKERS),
         "-b", f"127.0.0.1:{port}", "--log-level", "warning"],
        cwd=ROOT,
        env=os.environ.copy(),
    )  # fmt: skip
    try:
        session = _logged_in(requests.Session(), base)
        fleet = session.get(f"{base}/", timeout=60).text
        poll = POLL_RE.search(fleet)
        figures = {}
        for name, (path, htmx) in pages.items():
            if name.startswith("fleet poll"):
                if poll is None:
                    raise SystemExit("the fleet page has no live poll: cannot time it")
                path = poll.group(1).replace("&amp;", "&")
            figures[name] = _time_page(session, base + path, htmx, runs)
            figures[name] = PageFigures(
                figures[name].p50_ms,
                figures[name].p95_ms,
                _queries(path, htmx),
                figures[name].wire_kb,
            )
            print(f"    {name:36} p95 {figures[name].p95_ms:7.1f} ms")
        return figures
    finally:
        server.terminate()
        server.wait(timeout=30)


def _logged_in(session: Any, base: str) -> Any:
    deadline = time.monotonic() + 60
    while True:
        try:
            session.get(f"{base}/login/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    token = session.cookies.get("csrftoken")
    answer = session.post(
        f"{base}/login/",
        data={"username": "operator", "password": PASSWORD, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{base}/login/"},
        timeout=30,
    )
    if "sessionid" not in session.cookies:
        raise SystemExit(f"login failed: {answer.status_code}")
    return session


def _time_page(session: Any, url: str, htmx: bool, runs: int) -> PageFigures:
    headers = {"Accept-Encoding": "gzip"} | ({"HX-Request": "true"} if htmx else {})
    for _ in range(WARM_UP):  # every worker process warm, not only the first to answer
        session.get(url, headers=headers, timeout=60)
    times, wire = [], 0
    for _ in range(runs):
        began = time.perf_counter()
        response = session.get(url, headers=headers, timeout=60, stream=True)
        body = response.raw.read(decode_content=False)
        times.append((time.perf_counter() - began) * 1000)
        if response.status_code not in (200, 204):
            raise SystemExit(f"{url}: {response.status_code}")
        wire = len(body)
    p95 = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
    return PageFigures(statistics.median(times), p95, 0, wire / 1024)


def _queries(path: str, htmx: bool) -> int:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.force_login(User.objects.get(username="operator"))
    headers = {"HX-Request": "true"} if htmx else {}
    client.get(path, headers=headers)
    with CaptureQueriesContext(connection) as queries:
        client.get(path, headers=headers)
    return len(queries)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())

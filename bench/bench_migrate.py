"""Schema migrator benchmark (plain script), on SQLite and on a throwaway PostgreSQL server
(started as the tests start theirs, tests/postgres.py, but with fsync on):

    .venv/bin/python bench/bench_migrate.py [--rows 10000000] [--small-rows 10000]
        [--online-rows 1000000] [--chunk-rows 200] [--throttle 0.003] [--only sqlite|postgres]

1. add_column (nullable, and NOT NULL with a constant default) through SchemaMigrator.apply
   on a `--rows` table and on a `--small-rows` table: ms, and the ratio (aim: <= 10 ms,
   ratio <= 2: no row is rewritten).
2. Online add_index and online change_column_type (TEXT -> BIGINT) on an `--online-rows`
   table while a writer process inserts and updates continuously (one statement per
   transaction, about a thousand a second): rows lost or divergent after it (0: every row
   compared with the writer's own record of what it committed), the writer's p99 latency
   before vs during (aim: <= 3x), its longest single stall (aim: <= 100 ms). Baseline in the
   same run: the blocking CREATE INDEX and the blocking type change (PostgreSQL ALTER COLUMN
   TYPE; SQLite's table rebuild in one transaction, it has no ALTER COLUMN TYPE).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import postgres  # noqa: E402
from updates.engine.migrate import SchemaMigrator, parse_migration  # noqa: E402
from updates.engine.migrate.connection import connect  # noqa: E402

BASELINE_SECONDS = 3.0
WRITER_PAUSE = 0.001  # between two writes: continuous, paced like an application


def _migration(version: str, op: dict[str, Any]) -> Any:
    doc = {"version": version, "phase": "expand", "description": "bench", "operations": [op]}
    return parse_migration(json.dumps(doc).encode(), name=f"migrations/{version}.json")


# --- the table -----------------------------------------------------------------------------


def fill(url: str, rows: int) -> None:
    """orders(id, qty, amount TEXT, note) with `rows` rows, made by the database itself."""
    conn = connect(url)
    try:
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute(
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, qty INTEGER, amount TEXT, note TEXT)"
            if not url.startswith("sqlite")
            else "CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER, amount TEXT, note TEXT)"
        )
        if url.startswith("sqlite"):
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO orders SELECT i, i % 7, CAST(i * 3 AS TEXT), 'note ' || i FROM n",
                (rows,),
            )
        else:
            conn.execute(
                "INSERT INTO orders SELECT i, i % 7, (i * 3)::text, 'note ' || i"
                " FROM generate_series(1, ?) AS i",
                (rows,),
            )
            conn.execute("VACUUM ANALYZE orders")
    finally:
        conn.close()


# --- the writer process --------------------------------------------------------------------


def writer_main(url: str, rows: int, stop: Any, out: str, seed: int) -> None:
    """Insert and update continuously; record each statement's start and latency, and the
    last value written to every row touched."""
    rng = random.Random(seed)
    if url.startswith("sqlite"):
        raw: Any = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
        raw.execute("PRAGMA busy_timeout = 60000")
        mark = "?"
    else:
        import psycopg
        from psycopg.types.string import StrDumperUnknown

        raw = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        # Untyped text, so the same statement writes a TEXT and, after the change, a BIGINT.
        raw.adapters.register_dumper(str, StrDumperUnknown)
        mark = "%s"
    insert = f"INSERT INTO orders (id, qty, amount, note) VALUES ({mark}, {mark}, {mark}, 'w')"  # noqa: S608
    update = f"UPDATE orders SET qty = {mark}, amount = {mark} WHERE id = {mark}"  # noqa: S608
    model: dict[int, tuple[int, int]] = {}
    samples: list[tuple[float, float]] = []
    next_id = rows
    errors: list[str] = []
    while not stop.is_set():
        amount = rng.randrange(10**9)
        if rng.random() < 0.5:
            next_id += 1
            key, qty, sql = next_id, 1, insert
            params: tuple[Any, ...] = (key, qty, str(amount))
        else:
            key = rng.randrange(1, rows + 1)
            qty = model.get(key, (key % 7, 0))[0] + 1
            sql, params = update, (qty, str(amount), key)
        start = time.monotonic()
        try:
            raw.execute(sql, params)
        except Exception as exc:  # counted, the run goes on: a failed write is a finding
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        samples.append((start, time.monotonic() - start))
        model[key] = (qty, amount)
        time.sleep(WRITER_PAUSE)
    raw.close()
    Path(out).write_text(json.dumps({"model": model, "samples": samples, "errors": errors}))


@dataclass
class Figures:
    what: str
    seconds: float
    p99_before_ms: float
    p99_during_ms: float
    max_before_ms: float  # the noise floor: the longest write before the migration
    max_stall_ms: float
    stall_step: str  # the migrator's step the longest stall began in
    hold_ms: str  # the migrator's own longest chunk and its swap (what it makes writers wait)
    writes_during: int
    lost: int
    divergent: int
    write_errors: int

    def line(self) -> str:
        ratio = self.p99_during_ms / self.p99_before_ms if self.p99_before_ms else float("inf")
        return (
            f"  {self.what:<32} {self.seconds:6.1f} s  writer p99 {self.p99_before_ms:5.2f} ->"
            f" {self.p99_during_ms:6.2f} ms ({ratio:4.1f}x)  longest stall"
            f" {self.max_stall_ms:6.1f} ms (in {self.stall_step}; before: {self.max_before_ms:.1f})"
            f"{self.hold_ms}  writes {self.writes_during}  lost {self.lost}"
            f"  divergent {self.divergent}  failed writes {self.write_errors}"
        )


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return max(values, default=0.0) * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[98] * 1000


Step = Callable[[str], None]


def under_writes(
    url: str, rows: int, what: str, run: Callable[[Step], None], work: Path, throttle: float
) -> Figures:
    fill(url, rows)
    out = work / f"writer-{what.replace(' ', '_')}.json"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=writer_main, args=(url, rows, stop, str(out), 11))
    proc.start()
    time.sleep(BASELINE_SECONDS + 1.0)  # the writer's start-up, then its baseline
    marks: list[tuple[float, str]] = []
    began = time.monotonic()
    run(lambda step: marks.append((time.monotonic(), step)))
    ended = time.monotonic()
    time.sleep(0.5)
    stop.set()
    proc.join(120)
    data = json.loads(out.read_text())
    samples = data["samples"]
    before = [lat for t, lat in samples if began - BASELINE_SECONDS <= t < began]
    during = [lat for t, lat in samples if began <= t < ended]
    lost, divergent = compare(url, rows, {int(k): tuple(v) for k, v in data["model"].items()})
    worst = max(((lat, t) for t, lat in samples if began <= t < ended), default=(0.0, began))
    step = max((m for m in marks if m[0] <= worst[1]), default=(began, "start"))[1]
    return Figures(
        what, ended - began, _p99(before), _p99(during), max(before, default=0.0) * 1000,
        worst[0] * 1000, _STEP_NAMES.get(step, step), _holds(marks, throttle), len(during),
        lost, divergent, len(data["errors"]),
    )  # fmt: skip


def _holds(marks: list[tuple[float, str]], throttle: float) -> str:
    """How long the migrator's own transactions on the table took: the longest backfill
    chunk (the time between two chunks' commits, less the pause) and the swap. On a busy
    machine a writer's stall can be longer than anything the migrator holds."""
    chunks = [t for t, s in marks if s == "online.backfill_chunk"]
    at = {s: t for t, s in marks}
    if len(chunks) < 2 or "online.swapped" not in at:
        return ""
    longest = max(b - a for a, b in zip(chunks, chunks[1:], strict=False)) - throttle
    swap = at["online.swapped"] - at["online.verified"]
    return f"  [migrator: longest chunk {longest * 1000:.1f} ms, swap {swap * 1000:.1f} ms]"


# The step a stall began in is named by the last step boundary passed before it.
_STEP_NAMES = {
    "start": "operation", "migration.started": "operation", "online.shadow_created": "triggers",
    "online.triggers": "backfill", "online.backfill_chunk": "backfill",
    "online.backfilled": "verify",
    "online.verified": "swap", "online.swapped": "old-table drop",
    "online.old_dropped": "bookkeeping", "index.recorded": "concurrent build",
    "index.built": "bookkeeping", "op.applied": "history", "history.recorded": "end",
}  # fmt: skip


def compare(url: str, rows: int, model: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """Every row against what it must hold: the writer's last committed value, or the
    seed's for rows it never touched. (lost, divergent)."""
    conn = connect(url)
    try:
        table = {
            int(i): (int(q), int(a)) for i, q, a in conn.query("SELECT id, qty, amount FROM orders")
        }
    finally:
        conn.close()
    lost = divergent = 0
    expected_ids = set(range(1, rows + 1)) | set(model)
    for key in expected_ids:
        want = model.get(key) or (key % 7, key * 3)
        got = table.get(key)
        if got is None:
            lost += 1
        elif got != want:
            divergent += 1
    return lost, divergent + len(set(table) - expected_ids)


# --- scenarios -----------------------------------------------------------------------------


ADD_COLUMNS: list[dict[str, Any]] = [
    {"op": "add_column", "table": "orders", "column": "status", "type": "TEXT"},
    {"op": "add_column", "table": "orders", "column": "prio", "type": "INTEGER",
     "nullable": False, "default": 3},
]  # fmt: skip


def _first_time(marks: dict[str, float], step: str) -> None:
    marks.setdefault(step, time.perf_counter())


def bench_add_column(url_for: Callable[[str], str], rows: int, small: int, state: Path) -> None:
    """The operation's own transaction (ALTER TABLE and its progress record, commit
    included), and the whole apply() around it (resume, the in-flight record, history:
    two more commits)."""
    figures: dict[int, list[tuple[float, float]]] = {}
    for n in (small, rows):
        url = url_for(f"add{n}")
        fill(url, n)
        figures[n] = []
        for i, op in enumerate(ADD_COLUMNS):
            marks: dict[str, float] = {}
            hook = functools.partial(_first_time, marks)
            with SchemaMigrator(url, state_dir=state, plugins=[], fault=hook) as m:
                start = time.perf_counter()
                m.apply(_migration(f"{i + 1:04d}", op))
                whole = time.perf_counter() - start
            own = marks["op.applied"] - marks["migration.started"]
            figures[n].append((own * 1000, whole * 1000))
    for label, idx in (("nullable", 0), ("NOT NULL DEFAULT 3", 1)):
        (big, big_all), (little, little_all) = figures[rows][idx], figures[small][idx]
        print(
            f"  add_column {label:<18} {rows:>10,} rows: {big:6.2f} ms (apply {big_all:6.2f})"
            f"   {small:,} rows: {little:6.2f} ms (apply {little_all:6.2f})"
            f"   ratio {big / little:4.2f}   (aim <= 10 ms, ratio <= 2)"
        )


def bench_online(url: str, rows: int, args: argparse.Namespace, work: Path) -> None:
    sqlite = url.startswith("sqlite")
    tuning = {"chunk_rows": args.chunk_rows, "throttle_seconds": args.throttle}

    def migrate(url: str, op: dict[str, Any]) -> Callable[[Step], None]:
        def run(fault: Step) -> None:
            state = work / "state"
            with SchemaMigrator(url, state_dir=state, plugins=[], fault=fault, **tuning) as m:
                m.apply(_migration("0001", op))

        return run

    index = {"op": "add_index", "table": "orders", "name": "orders_amount", "columns": ["amount"]}
    change = {"op": "change_column_type", "table": "orders", "column": "amount", "type": "BIGINT"}
    cases = [
        ("online add_index", migrate(url, {**index, "online": True})),
        ("blocking CREATE INDEX (baseline)", migrate(url, {**index, "online": False})),
        ("online change_column_type", migrate(url, {**change, "online": True})),
        (
            "blocking type change (baseline)",
            (lambda _f: sqlite_rebuild(url))
            if sqlite
            else migrate(url, {**change, "online": False}),
        ),
    ]
    for what, run in cases:
        reset(url, work)
        print(under_writes(url, rows, what, run, work, args.throttle).line(), flush=True)


def reset(url: str, work: Path) -> None:
    """A fresh start: no history, no table (fill makes it)."""
    shutil.rmtree(work / "state", ignore_errors=True)
    conn = connect(url)
    try:
        for table in ("themis_schema_history", "orders"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        conn.close()


def sqlite_rebuild(url: str) -> None:
    """SQLite's documented way to change a column's type: a new table, filled, swapped, in
    one transaction (the write lock held throughout)."""
    conn = connect(url)
    try:
        with conn.transaction():
            conn.execute(
                "CREATE TABLE orders_new (id INTEGER PRIMARY KEY, qty INTEGER, amount BIGINT,"
                " note TEXT)"
            )
            conn.execute(
                "INSERT INTO orders_new SELECT id, qty, CAST(amount AS BIGINT), note FROM orders"
            )
            conn.execute("DROP TABLE orders")
            conn.execute("ALTER TABLE orders_new RENAME TO orders")
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=10_000)
    parser.add_argument("--online-rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=200)
    parser.add_argument("--throttle", type=float, default=0.003)
    parser.add_argument("--only", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--dir", type=Path, default=None, help="work dir (default: /var/tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir=args.dir or "/var/tmp"))
    print(f"cpus: {os.cpu_count()}  sqlite {sqlite3.sqlite_version}  work dir {work}")
    try:
        if args.only in (None, "sqlite"):
            print("SQLite (WAL, synchronous=FULL: the sqlite3 module's default)")
            bench_add_column(
                lambda n: f"sqlite:///{work}/{n}.db", args.rows, args.small_rows, work / "s"
            )
            bench_online(f"sqlite:///{work}/online.db", args.online_rows, args, work)
        if args.only in (None, "postgres"):
            with postgres.postgres_server(settings={}) as server:
                print(f"PostgreSQL ({server.bin_dir.parent.name}, default settings, fsync on)")
                urls: dict[str, str] = {}

                def url_for(name: str) -> str:
                    if name not in urls:
                        urls[name] = server.create_database(f"bench_{name}")
                    return urls[name]

                bench_add_column(url_for, args.rows, args.small_rows, work / "p")
                bench_online(url_for("online"), args.online_rows, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

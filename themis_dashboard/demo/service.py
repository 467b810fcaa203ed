#!/usr/bin/env python3
"""ThemisDB stand-in for the demo fleet (standard library only).

Installed on each demo node from a signed bundle as bin/themisd. Serves /health,
/version and /metrics over HTTP/1.1 keep-alive and writes its metrics to a file the
node agent reads. Like a real database binary it runs the code it was started with:
its version is read once, at start, so an update shows only once a new process runs.

Under the node's supervisor (`themis-update service run`) or systemd socket
activation it serves the inherited sockets (LISTEN_FDS/LISTEN_PID) and says READY=1
on NOTIFY_SOCKET once it accepts; on SIGTERM it stops accepting, answers the requests
in flight with `Connection: close`, closes idle connections after a grace period and
exits, so a reload drops no request. Without them it listens on --port itself.

Its data lives in the node database: SQLite (WAL) at STATE/data/themis.db, or the
PostgreSQL server THEMIS_NODE_DATABASE_URL names (psycopg must then be importable). It
creates its base `orders` table on first start; later releases change that schema
through their bundle's migrations, and a release whose code reads `orders.status`
(share/FEATURES lists `order-status`) serves /orders/summary by status, which fails on
a schema the migration has not reached: a missing migration is visible at once.

The file `misbehave` in the state dir (`manage.py demo_misbehave NODE [--mode down]`) makes
it answer errors and slowly while its health check still passes, so an update goes through
and the canary gate fails on the metrics; with `down` in it, the health check fails too (the
agent rolls the update back before the gate is asked).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

SD_LISTEN_FDS_START = 3
MAX_HEADER_BYTES = 16 * 1024
DATABASE_URL_ENV = "THEMIS_NODE_DATABASE_URL"
SEED_ORDERS = 500
BASE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL,"
    " qty INTEGER NOT NULL, amount INTEGER NOT NULL, legacy_note TEXT)"
)


class Database:
    """The node database, one short connection per query (the service is tiny)."""

    def __init__(self, state: Path) -> None:
        self.url = os.environ.get(DATABASE_URL_ENV, "").strip() or (
            f"sqlite:///{(state / 'data' / 'themis.db').absolute()}"
        )
        self.postgres = self.url.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> Any:
        if self.postgres:
            import psycopg  # only a PostgreSQL node needs it  # noqa: PLC0415

            return psycopg.connect(self.url, autocommit=True)
        conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            return list(conn.execute(sql).fetchall())
        finally:
            conn.close()

    def bootstrap(self) -> None:
        """The base schema and some rows, once (later schemas come from migrations)."""
        conn = self.connect()
        try:
            conn.execute(BASE_SCHEMA)
            if conn.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 0:
                rows = [(f"c{i % 37}", 1 + i % 5, 100 * (1 + i % 11)) for i in range(SEED_ORDERS)]
                mark = "%s" if self.postgres else "?"
                # Only the driver's placeholder is interpolated; the values are parameters.
                insert = (
                    f"INSERT INTO orders (customer, qty, amount) VALUES ({mark}, {mark}, {mark})"  # noqa: S608
                )
                if self.postgres:
                    with conn.cursor() as cur:
                        cur.executemany(insert, rows)
                else:
                    conn.executemany(insert, rows)
                    conn.commit()
        finally:
            conn.close()


def listen_fds() -> list[socket.socket]:
    """The sockets systemd-style activation passed to this very process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our own children
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


class Service:
    def __init__(self, install: Path, state: Path) -> None:
        self.install, self.state = install, state
        self.metrics_file = state / "service-metrics.json"
        self.version = self._installed_version()
        # Read once, like the version: the code this process runs.
        self.features = self._features()
        self.pid = os.getpid()
        self.started = time.time()
        self.database = Database(state)
        self.database.bootstrap()

    def _features(self) -> frozenset[str]:
        try:
            return frozenset((self.install / "share" / "FEATURES").read_text().split())
        except OSError:
            return frozenset()

    def _installed_version(self) -> str:
        try:
            return (self.install / "share" / "VERSION").read_text().strip()
        except OSError:
            return "unknown"

    @property
    def misbehaving(self) -> bool:
        return (self.state / "misbehave").exists()

    @property
    def down(self) -> bool:
        """Misbehaving so badly that the health check fails too."""
        try:
            return (self.state / "misbehave").read_text().strip() == "down"
        except OSError:
            return False

    def metrics(self) -> dict[str, object]:
        bad = self.misbehaving
        return {
            "error_rate": (0.12 + random.random() * 0.05) if bad else random.random() * 0.01,
            "p99_ms": (900 + random.random() * 300) if bad else 80 + random.random() * 60,
            "healthy": not self.down,
            "version": self.version,
        }

    def write_metrics(self) -> None:
        tmp = self.metrics_file.with_suffix(f".{self.pid}.tmp")
        tmp.write_text(json.dumps(self.metrics()))
        os.replace(tmp, self.metrics_file)

    def answer(self, path: str) -> tuple[int, dict[str, object]]:
        if path == "/health":
            ok = not self.down
            return (200 if ok else 500), {"ok": ok, "version": self.version, "pid": self.pid}
        if path == "/version":
            return 200, {"version": self.version, "pid": self.pid}
        if path == "/metrics":
            return 200, self.metrics()
        if path == "/orders/summary":
            return self.orders_summary()
        return 404, {"error": "not found"}

    def orders_summary(self) -> tuple[int, dict[str, object]]:
        """Order totals; by status when this release's code knows the column."""
        by = "status" if "order-status" in self.features else "'all'"
        # `by` is one of two constants above, never input.
        sql = f"SELECT {by}, COUNT(*), SUM(amount) FROM orders GROUP BY 1 ORDER BY 1"  # noqa: S608
        try:
            rows = self.database.query(sql)
        except Exception as err:  # the schema is not what this code needs: say so
            return 500, {"error": f"query failed: {err}", "version": self.version}
        groups = [
            {"key": str(key), "orders": count, "amount": int(total)} for key, count, total in rows
        ]
        return 200, {
            "version": self.version,
            "by": "status" if by == "status" else "all",
            "groups": groups,
        }


class Server:
    """HTTP/1.1 with keep-alive on asyncio; drains on SIGTERM."""

    def __init__(self, service: Service, grace: float) -> None:
        self.service, self.grace = service, grace
        self.draining = asyncio.Event()
        self.connections: set[asyncio.Task[None]] = set()
        self.idle: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                self.idle.add(writer)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                finally:
                    self.idle.discard(writer)
                if not await self.respond(head, writer):
                    return
        finally:
            self.connections.discard(task)
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    async def respond(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        body: dict[str, object]
        if len(parts) != 3:
            status, body, keep = 400, {"error": "bad request"}, False
        else:
            status, body = self.service.answer(parts[1])
            keep = b"connection: close" not in head.lower()
        if self.service.misbehaving:
            await asyncio.sleep(random.random() * 0.05)
        keep = keep and not self.draining.is_set()
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Error"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}"
            f"\r\n\r\n".encode()
            + data
        )
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return keep

    async def serve(self, sockets: list[socket.socket]) -> None:
        servers = [
            await asyncio.start_server(self.handle, sock=sock, limit=MAX_HEADER_BYTES)
            for sock in sockets
        ]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.draining.set)
        loop.add_signal_handler(signal.SIGINT, self.draining.set)
        writer = asyncio.create_task(self.keep_writing_metrics())
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        await self.draining.wait()
        for server in servers:
            # Stops accepting: the listening socket itself stays open in the supervisor
            # (and in the new process), so no connection is refused meanwhile.
            server.close()
        # Said once this process accepts no more: from here every new connection is
        # the new version's.
        sd_notify("STOPPING=1")
        await self.drain()
        writer.cancel()

    async def drain(self) -> None:
        """Requests in flight finish (answered with Connection: close); connections
        that stay idle until the grace period ends are closed."""
        deadline = time.monotonic() + self.grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for writer in list(self.idle):
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()
        for task in list(self.connections):
            task.cancel()

    async def keep_writing_metrics(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.service.write_metrics()
            await asyncio.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, help="listen here when no socket is passed")
    parser.add_argument("--install", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=5.0, help="drain period (seconds)")
    args = parser.parse_args()
    sockets = listen_fds()
    if not sockets:
        if args.port is None:
            parser.error("no socket passed (LISTEN_FDS) and no --port")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(1024)
        sockets = [sock]
    server = Server(Service(args.install, args.state), args.grace)
    asyncio.run(server.serve(sockets))


if __name__ == "__main__":
    main()

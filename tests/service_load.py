"""A keep-alive HTTP load generator for reload tests and the reload benchmark.

N connections each send GET requests back to back on one HTTP/1.1 connection and read
every answer whole. A server's `Connection: close` is honoured (the next request goes
on a new connection), as any HTTP client does. What counts as a failed request: a
refused connect, a connection reset or closed before the whole answer arrived, and a
5xx. Runs its own event loop in a thread, so a test can update the service meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    # (monotonic time, pid, version) of every answer, in arrival order.
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    connections_opened: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def pids(self) -> list[int]:
        """The serving pids in the order they first answered."""
        seen: list[int] = []
        for _t, pid, _v in self.answers:
            if pid not in seen:
                seen.append(pid)
        return seen

    def first_answer_from(self, pid: int) -> float | None:
        return next((t for t, p, _v in self.answers if p == pid), None)


class LoadGenerator:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connections: int,
        path: str = "/version",
        pause: float = 0.0,
    ):
        self.host, self.port, self.connections, self.path = host, port, connections, path
        # Think time between a connection's requests (0: back to back).
        self.pause = pause
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        self._started.wait(30)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(60)
        return self.report

    def wait_for_answers(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.report.ok >= count:
                return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._client()) for _ in range(self.connections)]
        self._started.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.02)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as err:
                self.report.failures[f"connect: {type(err).__name__}"] += 1
                await asyncio.sleep(0.01)
                continue
            self.report.connections_opened += 1
            try:
                await self._requests(reader, writer, request)
            finally:
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> None:
        while not self._stop.is_set():
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                headers = _headers(head)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as err:
                if not self._stop.is_set():
                    self.report.failures[f"answer: {type(err).__name__}"] += 1
                return
            status = int(head.split(b" ", 2)[1])
            if status >= 500:
                self.report.failures[f"status {status}"] += 1
            else:
                self.report.ok += 1
                self._record(body)
            if headers.get("connection", "").lower() == "close":
                return
            if self.pause:
                await asyncio.sleep(self.pause)

    def _record(self, body: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            answer = json.loads(body)
            self.report.answers.append(
                (time.monotonic(), int(answer["pid"]), str(answer["version"]))
            )


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}

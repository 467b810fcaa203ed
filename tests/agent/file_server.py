"""A real HTTP file server on 127.0.0.1 for the downloader's tests and benchmark.

Serves files (bytes in memory, or paths on disk) with one byte range per request, `ETag`
(the quoted SHA-256, as the dashboard does) and `If-Range`; throttles each connection to a
rate; and misbehaves on demand: cuts a connection after so many bytes, answers a status
first, serves wrong bytes for one file, ignores ranges, holds a body until released. Every
request is logged (path, Range, If-Range, status, bytes sent).

    python -m tests.agent.file_server DIR [--rate BYTES_PER_S]   # prints its port, serves DIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 64 * 1024


@dataclass
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    if_range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0


@dataclass
class Faults:
    """What the server does wrong, per path (the path as requested, without the query)."""

    cut_after: dict[str, list[int]] = field(default_factory=dict)  # next answers cut at N bytes
    statuses: dict[str, list[int]] = field(default_factory=dict)  # next answers: these statuses
    retry_after: str | None = None  # sent with 429/503 answers
    wrong: set[str] = field(default_factory=set)  # serve other bytes of the same length
    ignore_range: bool = False
    hold: dict[str, threading.Event] = field(default_factory=dict)  # body waits for the event
    hold_after: int = CHUNK  # bytes sent before a held body waits
    # Serve this content instead from now on (a file changed on the server).
    replaced: dict[str, bytes] = field(default_factory=dict)


class FileServer:
    def __init__(
        self,
        files: Mapping[str, bytes | Path],
        *,
        rate: float | None = None,
        token: str | None = None,
        port: int = 0,
    ) -> None:
        self.files: dict[str, bytes | Path] = dict(files)
        self.rate, self.token = rate, token
        self.faults = Faults()
        self.log: list[Served] = []
        self.lock = threading.Lock()
        self._etags: dict[str, str] = {}
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requests_for(self, path: str) -> list[Served]:
        with self.lock:
            return [served for served in self.log if served.path == "/" + path.lstrip("/")]

    def paths_requested(self) -> list[str]:
        with self.lock:
            return [served.path.lstrip("/") for served in self.log]

    def bytes_sent(self, path: str | None = None) -> int:
        with self.lock:
            return sum(s.sent for s in self.log if path is None or s.path == "/" + path)

    def etag(self, path: str, content: bytes | Path) -> str:
        with self.lock:
            if path not in self._etags:
                digest = hashlib.sha256()
                if isinstance(content, Path):
                    with open(content, "rb") as handle:
                        digest = hashlib.file_digest(handle, "sha256")
                else:
                    digest.update(content)
                self._etags[path] = f'"{digest.hexdigest()}"'
            return self._etags[path]

    def close(self) -> None:
        for event in self.faults.hold.values():
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Server(ThreadingHTTPServer):
    owner: FileServer
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-body is part of these tests, not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        assert isinstance(owner, FileServer)
        path = self.path.split("?", 1)[0]
        served = Served(
            path,
            self.headers.get("Range"),
            self.headers.get("If-Range"),
            self.headers.get("Authorization"),
        )
        with owner.lock:
            owner.log.append(served)
            faults = owner.faults
            status = faults.statuses.get(path, []).pop(0) if faults.statuses.get(path) else None
            cut = faults.cut_after.get(path, []).pop(0) if faults.cut_after.get(path) else None
        if owner.token is not None and served.authorization != f"Bearer {owner.token}":
            return self._plain(served, 403, b"bad token\n")
        if status is not None:
            return self._plain(served, status, b"scripted answer\n")
        key = path.lstrip("/")
        content = faults.replaced.get(key, owner.files.get(key))
        if content is None:
            return self._plain(served, 404, b"no such file\n")
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        etag = (
            owner.etag(key, content)
            if key not in faults.replaced
            else f'"{hashlib.sha256(faults.replaced[key]).hexdigest()}"'
        )
        first, last = 0, size - 1
        partial = False
        wanted = self._range(size)
        if_range = served.if_range
        if wanted is not None and not faults.ignore_range and (if_range in (None, etag)):
            if isinstance(wanted, str):  # unsatisfiable
                served.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            first, last = wanted
            partial = True
        served.status = 206 if partial else 200
        self.send_response(served.status)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        self._body(owner, served, content, first, last + 1, cut, key in faults.wrong)
        return None

    def _range(self, size: int) -> tuple[int, int] | str | None:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match is None:
            return None
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else size - 1
        if first >= size:
            return "unsatisfiable"
        return first, min(last, size - 1)

    def _body(
        self,
        owner: FileServer,
        served: Served,
        content: bytes | Path,
        start: int,
        end: int,
        cut: int | None,
        wrong: bool,
    ) -> None:
        hold = owner.faults.hold.get(served.path.lstrip("/"))
        handle = open(content, "rb") if isinstance(content, Path) else None  # noqa: SIM115
        began = time.monotonic()
        try:
            pos = start
            while pos < end:
                size = min(CHUNK, end - pos)
                if cut is not None:
                    size = min(size, start + cut - pos)
                    if size <= 0:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_WR)  # a clean FIN mid-body
                        self.close_connection = True
                        return
                if (
                    hold is not None
                    and not hold.is_set()
                    and pos - start >= owner.faults.hold_after
                ):
                    self.wfile.flush()
                    hold.wait(120)  # longer than any test may take
                if handle is not None:
                    handle.seek(pos)
                    data = handle.read(size)
                else:
                    assert isinstance(content, bytes)
                    data = content[pos : pos + size]
                if wrong:
                    data = bytes(b ^ 0x5A for b in data)
                if owner.rate:
                    # Per connection: never ahead of `rate` bytes per second.
                    due = began + (pos - start + len(data)) / owner.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                self.wfile.write(data)
                pos += len(data)
                with owner.lock:
                    served.sent += len(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if handle is not None:
                handle.close()

    def _plain(self, served: Served, status: int, body: bytes) -> None:
        served.status = status
        self.send_response(status)
        if status in (429, 503) and self.server.owner.faults.retry_after:  # type: ignore[attr-defined]
            self.send_header("Retry-After", self.server.owner.faults.retry_after)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--rate", type=float, help="bytes per second per connection")
    args = parser.parse_args()
    files: dict[str, bytes | Path] = {
        str(p.relative_to(args.root)): p for p in sorted(args.root.rglob("*")) if p.is_file()
    }
    server = FileServer(files, rate=args.rate)
    print(server.port, flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        server.close()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

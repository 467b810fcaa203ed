"""The agent's resumable download against a real HTTP server on 127.0.0.1
that cuts the connection half-way through its first answer."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.releases.conftest import payload
from updates.engine.errors import ManifestInvalid
from workers.download import (
    DownloadCorrupt,
    DownloadFailed,
    DownloadRefused,
    download_resumable,
)

CONTENT = payload(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(CONTENT).hexdigest()
HALF = len(CONTENT) // 2
TOKEN = "job-token"


@dataclass
class Behaviour:
    """What the server does; `requests` records each request's headers."""

    cut_first_at: int | None = HALF  # bytes sent before the first answer is cut
    honour_range: bool = True
    status: int | None = None  # answer every request with this status instead
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour: Behaviour

    def log_message(self, *_args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        assert isinstance(self.server, _Server)  # narrows: the server below holds the behaviour
        behaviour = self.server.behaviour
        behaviour.requests.append(dict(self.headers.items()))
        if behaviour.status is not None:
            return self._plain(behaviour.status, b"refused\n")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._plain(403, b"bad token\n")
        start = self._range_start() if behaviour.honour_range else None
        if start is None:
            self._send(200, CONTENT, cut=behaviour.cut_first_at)
        else:
            self._send(206, CONTENT[start:], first=start)
        behaviour.cut_first_at = None  # only the first answer is cut

    def _range_start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match else None

    def _send(self, status: int, body: bytes, *, cut: int | None = None, first: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))  # always the full length
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{len(CONTENT) - 1}/{len(CONTENT)}")
        self.end_headers()
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        # A clean FIN after half the body: the client has every byte sent so far.
        self.connection.shutdown(socket.SHUT_WR)
        self.close_connection = True

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    behaviour: Behaviour

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-body is part of these tests, not news


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.behaviour = behaviour
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/bundle", behaviour
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_cut_connection_resumes_from_the_bytes_it_has(
    server: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = server
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "dl" / "bundle.tar"
    result = download_resumable(
        url, TOKEN, dest, sha256=SHA, size=len(CONTENT), progress=lambda d, t: seen.append((d, t))
    )
    assert result == dest
    assert dest.read_bytes() == CONTENT
    assert _listing(dest.parent) == ["bundle.tar"]  # no .part left
    assert len(behaviour.requests) == 2
    assert "Range" not in behaviour.requests[0]
    assert behaviour.requests[1]["Range"] == f"bytes={HALF}-"
    assert behaviour.requests[1]["If-Range"] == f'"{SHA}"'
    assert behaviour.requests[1]["Authorization"] == f"Bearer {TOKEN}"
    assert seen[-1] == (len(CONTENT), len(CONTENT))
    assert any(done == HALF for done, _ in seen)  # the first half was kept, not refetched


def test_size_is_optional(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    dest = download_resumable(url, TOKEN, tmp_path / "bundle.tar.zst", sha256=SHA, backoff=0)
    assert dest.read_bytes() == CONTENT
    assert behaviour.requests[1]["Range"] == f"bytes={HALF}-"
    assert _listing(tmp_path) == ["bundle.tar.zst"]


def test_server_ignoring_range_means_starting_over(
    server: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = server
    behaviour.honour_range = False
    dest = download_resumable(url, TOKEN, tmp_path / "b.tar", sha256=SHA, backoff=0)
    assert dest.read_bytes() == CONTENT  # the 200 body replaced the half, not appended to it
    assert behaviour.requests[1]["Range"] == f"bytes={HALF}-"
    assert _listing(tmp_path) == ["b.tar"]


def test_wrong_sha256_leaves_no_file(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(DownloadCorrupt, match="SHA-256") as caught:
        download_resumable(url, TOKEN, tmp_path / "b.tar", sha256="ab" * 32, backoff=0)
    assert isinstance(caught.value, ManifestInvalid)
    assert caught.value.code == "MANIFEST_INVALID"
    assert _listing(tmp_path) == []


def test_size_differing_from_the_release_is_refused(
    server: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, _ = server
    with pytest.raises(DownloadCorrupt, match="release has"):
        download_resumable(url, TOKEN, tmp_path / "b.tar", sha256=SHA, size=len(CONTENT) - 1)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("status", [403, 404, 410])
def test_refusal_is_not_retried(server: tuple[str, Behaviour], tmp_path: Path, status: int) -> None:
    url, behaviour = server
    behaviour.status = status
    with pytest.raises(DownloadRefused, match=f"HTTP {status}"):
        download_resumable(url, TOKEN, tmp_path / "b.tar", sha256=SHA, backoff=0)
    assert len(behaviour.requests) == 1


def test_server_errors_are_retried_then_given_up(
    server: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = server
    behaviour.status = 503
    with pytest.raises(DownloadFailed, match="failed 3 times"):
        download_resumable(url, TOKEN, tmp_path / "b.tar", sha256=SHA, attempts=3, backoff=0)
    assert len(behaviour.requests) == 3


def test_no_server_at_all(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(DownloadFailed, match="ConnectionError"):
            download_resumable(
                f"http://127.0.0.1:{port}/b", TOKEN, tmp_path / "b.tar", sha256=SHA, backoff=0
            )
    assert _listing(tmp_path) == []


def test_an_existing_good_file_needs_no_request(
    server: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = server
    dest = tmp_path / "b.tar"
    dest.write_bytes(CONTENT)
    assert download_resumable(url, TOKEN, dest, sha256=SHA) == dest
    assert behaviour.requests == []


def test_a_complete_part_is_only_verified(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    (tmp_path / "b.tar.part").write_bytes(CONTENT)
    dest = download_resumable(url, TOKEN, tmp_path / "b.tar", sha256=SHA, size=len(CONTENT))
    assert dest.read_bytes() == CONTENT
    assert behaviour.requests == []
    assert _listing(tmp_path) == ["b.tar"]


def test_the_agent_side_imports_no_django() -> None:
    code = "import sys, workers.download; sys.exit('django' in sys.modules)"
    env = {"PATH": "/usr/bin:/bin"}  # no DJANGO_SETTINGS_MODULE either
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, check=False)
    assert run.returncode == 0

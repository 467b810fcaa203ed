"""The agent's resumable download against a real HTTP server on 127.0.0.1 that answers
each request as scripted: a refused or misplaced resume, a body that ends early or runs
long, a status the download has no use for. What is on disk afterwards is the release's
bundle or nothing."""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.releases.conftest import payload
from updates.engine.errors import UsageError
from workers.download import DownloadCorrupt, DownloadFailed, download_resumable

CONTENT = payload(256 * 1024 + 7)
SHA = hashlib.sha256(CONTENT).hexdigest()
SIZE = len(CONTENT)
HALF = SIZE // 2


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Without a Content-Length the body ends when the server closes the connection.
    length: bool = True


def full() -> Answer:
    return Answer(200, CONTENT)


def part_from(start: int) -> Answer:
    return Answer(206, CONTENT[start:], {"Content-Range": f"bytes {start}-{SIZE - 1}/{SIZE}"})


@dataclass
class Script:
    answers: deque[Answer] = field(default_factory=deque)
    ranges: list[str | None] = field(default_factory=list)  # each request's Range header


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        assert isinstance(self.server, _Server)  # narrows: the server holds the script
        script = self.server.script
        script.ranges.append(self.headers.get("Range"))
        answer = script.answers.popleft()
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.length:
            self.send_header("Content-Length", str(len(answer.body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer.body)


class _Server(ThreadingHTTPServer):
    script: Script

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-body is part of these tests, not news


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.script = Script()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/bundle", httpd.script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _get(url: str, dest: Path, *, size: int | None = SIZE) -> Path:
    return download_resumable(url, "t", dest, sha256=SHA, size=size, backoff=0.01, timeout=10)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_sha256_that_is_not_hex_is_refused_before_any_request(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    with pytest.raises(UsageError, match="expected a hex SHA-256"):
        download_resumable(url, "t", tmp_path / "b.bundle", sha256="not-a-digest")
    assert script.ranges == [] and _listing(tmp_path) == []


def test_a_part_longer_than_the_release_is_dropped_and_fetched_whole(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    (tmp_path / "b.bundle.part").write_bytes(CONTENT + b"trailing junk")
    script.answers.append(full())
    assert _get(url, tmp_path / "b.bundle").read_bytes() == CONTENT
    assert script.ranges == [None]  # no resume from bytes that cannot be the release's
    assert _listing(tmp_path) == ["b.bundle"]


def test_a_resume_refused_for_a_part_holding_every_byte_is_only_verified(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    (tmp_path / "b.bundle.part").write_bytes(CONTENT)
    # Without a size the download cannot tell the part is complete: it asks for the rest.
    script.answers.append(Answer(416, headers={"Content-Range": f"bytes */{SIZE}"}))
    assert _get(url, tmp_path / "b.bundle", size=None).read_bytes() == CONTENT
    assert script.ranges == [f"bytes={SIZE}-"]
    assert _listing(tmp_path) == ["b.bundle"]


def test_a_resume_refused_for_a_part_of_another_length_starts_over(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    (tmp_path / "b.bundle.part").write_bytes(CONTENT[:100])
    script.answers.extend([Answer(416, headers={"Content-Range": "bytes */99"}), full()])
    assert _get(url, tmp_path / "b.bundle").read_bytes() == CONTENT
    assert script.ranges == ["bytes=100-", None]


def test_a_resume_answered_from_another_offset_starts_over(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    (tmp_path / "b.bundle.part").write_bytes(CONTENT[:100])
    # Splicing bytes from 50 on after 100 bytes would corrupt the file: they are refused.
    script.answers.extend([part_from(50), full()])
    assert _get(url, tmp_path / "b.bundle").read_bytes() == CONTENT
    assert script.ranges == ["bytes=100-", None]


def test_a_body_that_ends_early_is_resumed_where_it_ended(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    script.answers.extend([Answer(200, CONTENT[:HALF], length=False), part_from(HALF)])
    assert _get(url, tmp_path / "b.bundle").read_bytes() == CONTENT
    assert script.ranges == [None, f"bytes={HALF}-"]


def test_a_body_longer_than_the_release_is_corrupt_and_nothing_is_kept(
    server: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = server
    script.answers.append(Answer(200, CONTENT + b"more", length=False))
    with pytest.raises(DownloadCorrupt, match=f"more than {SIZE} bytes"):
        _get(url, tmp_path / "b.bundle")
    assert _listing(tmp_path) == [] and len(script.ranges) == 1  # not retried


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(204), "unexpected HTTP 204"),
        (Answer(206, CONTENT), "206 without a usable Content-Range"),
        (Answer(206, CONTENT, {"Content-Range": "bytes 0-9"}), "206 without a usable"),
    ],
    ids=["no-content", "206-without-range", "206-with-garbled-range"],
)
def test_an_answer_the_download_cannot_use_fails_it_without_retrying(
    server: tuple[str, Script], tmp_path: Path, answer: Answer, message: str
) -> None:
    url, script = server
    script.answers.append(answer)
    with pytest.raises(DownloadFailed, match=message):
        _get(url, tmp_path / "b.bundle")
    assert len(script.ranges) == 1 and not (tmp_path / "b.bundle").exists()

"""The node's parallel downloader against a real HTTP server on 127.0.0.1 that cuts
connections, throttles, answers errors, ignores ranges, changes files and serves wrong bytes.

No assertion here depends on wall time: the bandwidth limit and the backoff are checked with
an injected clock and sleep."""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.file_server import FileServer
from tests.releases.conftest import payload
from updates.engine.errors import ManifestInvalid, UsageError
from updates.engine.parts import HashedFile
from workers import fetch
from workers.download import DownloadCorrupt, DownloadFailed, DownloadRefused
from workers.fetch import (
    DownloadTask,
    FileSink,
    ParallelDownloader,
    Progress,
    TerminalProgress,
    TokenBucket,
    priority_for,
)

KiB, MiB = 1 << 10, 1 << 20
FILES = {f"f{i}.bin": payload(300 * KiB + i * 1000, seed=i) for i in range(6)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeClock:
    """Time that moves only when somebody sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer(FILES)
    yield srv
    srv.close()


def tasks_for(srv: FileServer, dest: Path, names: list[str] | None = None) -> list[DownloadTask]:
    return [
        DownloadTask(url=srv.url(name), size=len(data), sha256=sha(data), dest=dest / name)
        for name, data in srv.files.items()
        if names is None or name in names
        if isinstance(data, bytes)
    ]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_fetches_every_file_in_parallel_and_checks_each(server: FileServer, tmp_path: Path) -> None:
    stats = ParallelDownloader(concurrency=4).run(tasks_for(server, tmp_path))
    for name, data in FILES.items():
        assert (tmp_path / name).read_bytes() == data
    assert listing(tmp_path) == sorted(FILES)  # no .part left
    assert stats.files == len(FILES) and stats.bytes_fetched == sum(map(len, FILES.values()))
    assert stats.retries == 0 and stats.requests == len(FILES)


def test_priority_order_executables_and_manifest_first(tmp_path: Path) -> None:
    files = {name: payload(10 * KiB, seed=n) for n, name in enumerate(["a", "b", "c", "d"])}
    srv = FileServer(files)
    try:
        priorities = {"a": 0, "b": 50, "c": 100, "d": 50}
        tasks = [
            DownloadTask(
                url=srv.url(name),
                size=len(data),
                sha256=sha(data),
                dest=tmp_path / name,
                priority=priorities[name],
            )
            for name, data in files.items()
        ]
        stats = ParallelDownloader(concurrency=1).run(tasks)
        # Highest first; equal priorities keep the order given.
        assert srv.paths_requested() == ["c", "b", "d", "a"]
        assert stats.order == ["c", "b", "d", "a"]
    finally:
        srv.close()
    assert priority_for("manifest.json") > priority_for("bin/themisd") > priority_for("lib/x.so")
    assert priority_for("tools/run", 0o755) == priority_for("bin/themisd")
    assert priority_for("share/doc.txt", 0o644) == fetch.PRIORITY_DEFAULT


def test_resumes_after_a_connection_cut_without_fetching_twice(
    server: FileServer, tmp_path: Path
) -> None:
    name, data = "f1.bin", FILES["f1.bin"]
    server.faults.cut_after["/f1.bin"] = [100_000]
    sleeper = FakeClock()
    stats = ParallelDownloader(concurrency=2, sleep=sleeper.sleep).run(
        tasks_for(server, tmp_path, [name])
    )
    assert (tmp_path / name).read_bytes() == data
    first, second = server.requests_for(name)
    assert (first.range, first.status, first.sent) == (None, 200, 100_000)
    assert second.range == f"bytes=100000-{len(data) - 1}" and second.status == 206
    assert second.if_range == f'"{sha(data)}"'  # never spliced onto another file
    assert server.bytes_sent(name) == len(data) and stats.retries == 1
    assert listing(tmp_path) == [name]


def test_resumes_the_part_an_earlier_run_left(server: FileServer, tmp_path: Path) -> None:
    name, data = "f2.bin", FILES["f2.bin"]
    (tmp_path / f"{name}.part").write_bytes(data[:123_456])
    stats = ParallelDownloader(concurrency=1).run(tasks_for(server, tmp_path, [name]))
    assert (tmp_path / name).read_bytes() == data
    (only,) = server.requests_for(name)
    assert only.range == f"bytes=123456-{len(data) - 1}" and only.status == 206
    assert stats.bytes_resumed == 123_456 and stats.bytes_fetched == len(data) - 123_456


def test_a_file_changed_on_the_server_starts_over_and_is_refused(
    server: FileServer, tmp_path: Path
) -> None:
    """The resumed request carries If-Range: a changed file answers 200 with all of its new
    bytes, which replace what was held (never spliced), and fail the expected SHA-256."""
    name, data = "f3.bin", FILES["f3.bin"]
    (tmp_path / f"{name}.part").write_bytes(data[:50_000])
    server.faults.replaced[name] = payload(len(data), seed=99)
    with pytest.raises(DownloadCorrupt, match=f"{name}: SHA-256 .* differs"):
        ParallelDownloader(concurrency=1).run(tasks_for(server, tmp_path, [name]))
    (only,) = server.requests_for(name)
    assert only.if_range == f'"{sha(data)}"' and only.status == 200
    assert listing(tmp_path) == []  # not the file's bytes: nothing kept


def test_large_files_come_as_parallel_ranges(tmp_path: Path) -> None:
    big = payload(10 * MiB + 17, seed=3)
    srv = FileServer({"big": big})
    try:
        task = DownloadTask(url=srv.url("big"), size=len(big), sha256=sha(big), dest=tmp_path / "b")
        ParallelDownloader(concurrency=4, split_bytes=8 * MiB).run([task])
        served = srv.requests_for("big")
    finally:
        srv.close()
    assert (tmp_path / "b").read_bytes() == big
    assert len(served) >= 2 and all(s.status == 206 for s in served)
    spans = sorted(tuple(map(int, s.range.removeprefix("bytes=").split("-"))) for s in served)  # type: ignore[union-attr]
    assert spans[0][0] == 0 and spans[-1][1] == len(big) - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert srv.bytes_sent() == len(big)  # each byte once


def test_a_server_that_ignores_ranges_sends_the_file_whole(tmp_path: Path) -> None:
    big = payload(10 * MiB, seed=4)
    srv = FileServer({"big": big})
    srv.faults.ignore_range = True
    try:
        task = DownloadTask(url=srv.url("big"), size=len(big), sha256=sha(big), dest=tmp_path / "b")
        ParallelDownloader(concurrency=4, split_bytes=8 * MiB).run([task])
        served = srv.requests_for("big")
    finally:
        srv.close()
    assert (tmp_path / "b").read_bytes() == big
    assert [(s.status, s.sent) for s in served] == [(200, len(big))]


def test_a_cut_range_of_a_split_file_resumes_its_own_range(tmp_path: Path) -> None:
    big = payload(12 * MiB, seed=5)
    srv = FileServer({"big": big})
    srv.faults.cut_after["/big"] = [1 * MiB]  # the first answer (the first range) is cut
    try:
        task = DownloadTask(url=srv.url("big"), size=len(big), sha256=sha(big), dest=tmp_path / "b")
        clock = FakeClock()
        ParallelDownloader(concurrency=3, split_bytes=8 * MiB, sleep=clock.sleep).run([task])
        served = srv.requests_for("big")
    finally:
        srv.close()
    assert (tmp_path / "b").read_bytes() == big
    assert served[0].sent == 1 * MiB
    assert any(s.range is not None and s.range.startswith(f"bytes={MiB}-") for s in served)
    assert srv.bytes_sent() == len(big)


def test_transient_errors_are_retried_with_exponential_backoff_and_jitter(
    server: FileServer, tmp_path: Path
) -> None:
    server.faults.statuses["/f0.bin"] = [503, 500, 503]
    clock = FakeClock()
    stats = ParallelDownloader(
        concurrency=1, backoff=1.0, sleep=clock.sleep, rng=random.Random(1)
    ).run(tasks_for(server, tmp_path, ["f0.bin"]))
    assert (tmp_path / "f0.bin").read_bytes() == FILES["f0.bin"]
    assert stats.retries == 3 and len(clock.slept) == 3
    # Each wait is half its exponential step plus up to as much again at random.
    for n, delay in enumerate(clock.slept):
        step = 2.0**n
        assert step / 2 <= delay <= step
    assert len(set(clock.slept)) == 3


def test_retry_after_is_a_floor_for_the_wait(server: FileServer, tmp_path: Path) -> None:
    server.faults.statuses["/f0.bin"] = [429]
    server.faults.retry_after = "7"
    clock = FakeClock()
    ParallelDownloader(concurrency=1, backoff=0.1, sleep=clock.sleep).run(
        tasks_for(server, tmp_path, ["f0.bin"])
    )
    assert clock.slept == [7.0]


def test_retries_give_up_naming_the_file_and_the_cause(server: FileServer, tmp_path: Path) -> None:
    server.faults.statuses["/f4.bin"] = [503] * 10
    clock = FakeClock()
    downloader = ParallelDownloader(concurrency=1, attempts=3, sleep=clock.sleep)
    with pytest.raises(
        DownloadFailed, match=r"f4\.bin: 3 attempts in a row failed, the last: HTTP 503"
    ):
        downloader.run(tasks_for(server, tmp_path, ["f4.bin"]))
    assert len(server.requests_for("f4.bin")) == 3 and len(clock.slept) == 2
    assert listing(tmp_path) == []


def test_a_refusal_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    server.faults.statuses["/f5.bin"] = [410]
    with pytest.raises(DownloadRefused, match=r"f5\.bin: HTTP 410"):
        ParallelDownloader(concurrency=1).run(tasks_for(server, tmp_path, ["f5.bin"]))
    assert len(server.requests_for("f5.bin")) == 1
    assert listing(tmp_path) == []


@pytest.mark.timeout(60)
def test_a_wrong_file_stops_every_other_transfer_at_once(
    server: FileServer, tmp_path: Path
) -> None:
    """f0 comes with wrong bytes; f1 and f2 are in flight, their server stalled after a first
    chunk (it would wait far longer than this test may take): run() must not wait for them."""
    server.faults.wrong.add("f0.bin")
    for held in ("f1.bin", "f2.bin"):
        server.faults.hold[held] = threading.Event()
    tasks = tasks_for(server, tmp_path, ["f0.bin", "f1.bin", "f2.bin"])
    tasks[0] = DownloadTask(
        url=tasks[0].url,
        size=tasks[0].size,
        sha256=tasks[0].sha256,
        dest=tasks[0].dest,
        priority=-1,  # after the others have started
    )
    with pytest.raises(DownloadCorrupt, match=r"f0\.bin: SHA-256 .* differs"):
        ParallelDownloader(concurrency=3).run(tasks)
    assert not any(event.is_set() for event in server.faults.hold.values())  # still stalled
    assert not (tmp_path / "f0.bin").exists() and not (tmp_path / "f0.bin.part").exists()
    for held in ("f1.bin", "f2.bin"):
        assert not (tmp_path / held).exists()
        part = tmp_path / f"{held}.part"
        # What was received stays for a resume, and is the file's own prefix.
        if part.exists():
            assert FILES[held].startswith(part.read_bytes())


def test_a_throttled_server_is_followed_to_the_end(tmp_path: Path) -> None:
    """A server that trickles each connection: every byte arrives, progress is reported
    along the way, and nothing is retried (slow is not broken)."""
    files = {name: payload(96 * KiB, seed=n) for n, name in enumerate(["slow-a", "slow-b"])}
    srv = FileServer(files, rate=1 * MiB)
    seen: list[Progress] = []
    try:
        stats = ParallelDownloader(
            concurrency=2, progress=seen.append, progress_interval=0.0, chunk_bytes=8 * KiB
        ).run(tasks_for(srv, tmp_path))
    finally:
        srv.close()
    assert all((tmp_path / name).read_bytes() == data for name, data in files.items())
    assert stats.retries == 0 and stats.requests == 2
    total = sum(map(len, files.values()))
    assert len([p for p in seen if 0 < p.done < total]) >= 4
    assert seen[-1].done == total


def test_the_global_limit_holds_across_connections(server: FileServer, tmp_path: Path) -> None:
    """The clock moves only when the bucket makes a connection wait: the time it shows at
    the end is the time the limit demands for the bytes, to the microsecond."""
    clock = FakeClock()
    start = clock.now
    limit = 1 * MiB
    downloader = ParallelDownloader(
        concurrency=4, limit_bps=limit, clock=clock, sleep=clock.sleep, chunk_bytes=16 * KiB
    )
    assert downloader.bucket is not None
    burst = downloader.bucket.burst
    stats = downloader.run(tasks_for(server, tmp_path))
    total = sum(map(len, FILES.values()))
    assert stats.bytes_fetched == total
    assert clock.now - start == pytest.approx((total - burst) / limit, abs=1e-6)
    assert max(clock.slept) <= 16 * KiB / limit + 1e-9  # no connection ran ahead and paid later


def test_token_bucket_shared_by_threads() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=100.0, clock=clock, sleep=clock.sleep)

    def take() -> None:
        for _ in range(50):
            bucket.take(10)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clock.now - 1000.0 == pytest.approx((4 * 50 * 10 - 100) / 1000.0)


def test_progress_reports_bytes_rate_and_eta(server: FileServer, tmp_path: Path) -> None:
    clock = FakeClock()
    seen: list[Progress] = []
    limit = 256 * KiB
    ParallelDownloader(
        concurrency=1,  # one thread: the fake clock's steps come in one order
        limit_bps=limit,
        clock=clock,
        sleep=clock.sleep,
        progress=seen.append,
        progress_interval=0.1,
        chunk_bytes=16 * KiB,
    ).run(tasks_for(server, tmp_path))
    total = sum(map(len, FILES.values()))
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == seen[-1].total == total and seen[-1].eta == 0
    assert seen[-1].files_done == seen[-1].files_total == len(FILES)
    # Once the first burst has left the rate's window, the rate is the limit.
    middle = [p for p in seen if 4 * limit <= p.done < total]
    assert middle
    for snapshot in middle:
        assert snapshot.rate == pytest.approx(limit, rel=0.1)
        assert snapshot.eta == pytest.approx((total - snapshot.done) / snapshot.rate)


def test_a_terminal_gets_a_bar_anything_else_nothing() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    snapshot = Progress(
        done=5 * MiB, total=10 * MiB, rate=1 * MiB, eta=5.0, files_done=1, files_total=3
    )
    for stream in (tty, pipe):
        bar = TerminalProgress(stream)
        bar(snapshot)
        bar.close()
    assert pipe.getvalue() == ""
    line = tty.getvalue()
    assert line.startswith("\r[") and line.endswith("\n")
    assert "50.0%" in line and "5.0/10.0 MiB" in line and "ETA 5s" in line and "(1/3 files)" in line


def test_hashed_file_hashes_ranges_that_arrive_out_of_order(tmp_path: Path) -> None:
    data = payload(300_000, seed=8)
    path = tmp_path / "f"
    with open(path, "w+b") as handle:
        hashed = HashedFile(handle.fileno(), size=len(data), sha256=sha(data), name="f")
        for start in (200_000, 100_000, 250_000, 150_000):
            hashed.write_at(start, data[start : start + 50_000])
        assert hashed.held == 0
        hashed.write_at(0, data[:100_000])
        assert hashed.held == len(data)
        hashed.check()
        hashed.truncate(1000)
        assert hashed.held == 1000
        with pytest.raises(ManifestInvalid, match="only 1000 of its 300000 bytes"):
            hashed.check()
        with pytest.raises(ManifestInvalid, match="outside what is still missing"):
            hashed.write_at(0, b"x")
        hashed.write_at(1000, data[1000:])
        hashed.check()
    assert path.read_bytes() == data


def test_file_sink_leaves_nothing_when_nothing_arrived(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "x", size=10, sha256="0" * 64)
    sink.close()
    assert listing(tmp_path) == []


def test_command_line_fetch(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = [
        {"url": server.url(n), "sha256": sha(d), "size": len(d), "dest": str(tmp_path / n)}
        for n, d in FILES.items()
    ]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    assert fetch.main(["--list", str(tmp_path / "list.json"), "--concurrency", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)  # not a terminal: a summary, no bar
    assert summary["files"] == len(FILES)
    assert all((tmp_path / n).read_bytes() == d for n, d in FILES.items())
    data = FILES["f0.bin"]
    code = fetch.main(
        [
            server.url("f0.bin"),
            "--sha256",
            "1" * 64,
            "--size",
            str(len(data)),
            "-o",
            str(tmp_path / "bad"),
        ]
    )
    assert code == 12
    assert "f0.bin" not in capsys.readouterr().out
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.part").exists()


def test_an_unreachable_server_is_retried_then_named(tmp_path: Path) -> None:
    srv = FileServer({})
    url = srv.url("gone.bin")
    srv.close()  # nothing listens there any more
    clock = FakeClock()
    task = DownloadTask(url=url, size=10, sha256="0" * 64, dest=tmp_path / "gone.bin")
    with pytest.raises(
        DownloadFailed, match=r"gone\.bin: 2 attempts in a row failed, the last: Conn"
    ):
        ParallelDownloader(attempts=2, sleep=clock.sleep).run([task])
    assert listing(tmp_path) == []


def test_a_server_with_a_shorter_file_is_refused(server: FileServer, tmp_path: Path) -> None:
    """The held bytes reach past the server's file: 416, start over, and the whole answer
    has the wrong length."""
    data = FILES["f0.bin"]
    (tmp_path / "f0.bin.part").write_bytes(data + b"extra")
    task = DownloadTask(
        url=server.url("f0.bin"), size=len(data) + 10, sha256=sha(data), dest=tmp_path / "f0.bin"
    )
    with pytest.raises(DownloadCorrupt, match=rf"the server has {len(data)} bytes"):
        ParallelDownloader(sleep=FakeClock().sleep).run([task])
    assert [s.status for s in server.requests_for("f0.bin")] == [416, 200]
    assert listing(tmp_path) == []


def test_an_unexpected_answer_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    server.faults.statuses["/f1.bin"] = [418]
    with pytest.raises(DownloadFailed, match=r"f1\.bin: unexpected HTTP 418"):
        ParallelDownloader().run(tasks_for(server, tmp_path, ["f1.bin"]))
    assert len(server.requests_for("f1.bin")) == 1


def test_a_file_already_in_place_is_not_fetched_again(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "f2.bin").write_bytes(FILES["f2.bin"])
    (tmp_path / "f3.bin").write_bytes(b"stale")
    stats = ParallelDownloader().run(tasks_for(server, tmp_path, ["f2.bin", "f3.bin"]))
    assert server.paths_requested() == ["f3.bin"] and stats.files == 2
    assert (tmp_path / "f3.bin").read_bytes() == FILES["f3.bin"]


def test_a_failing_completion_hook_stops_the_run_naming_the_file(
    server: FileServer, tmp_path: Path
) -> None:
    def hook(task: DownloadTask) -> None:
        raise OSError("disk gone")

    with pytest.raises(DownloadFailed, match=r"f4\.bin: OSError: disk gone"):
        ParallelDownloader(on_file_done=hook).run(tasks_for(server, tmp_path, ["f4.bin"]))


def test_a_run_can_be_cancelled_from_another_thread(server: FileServer, tmp_path: Path) -> None:
    server.faults.hold["f5.bin"] = threading.Event()
    downloader = ParallelDownloader()
    timer = threading.Timer(0.2, downloader.cancel)
    timer.start()
    with pytest.raises(DownloadFailed, match="download cancelled"):
        downloader.run(tasks_for(server, tmp_path, ["f5.bin"]))
    timer.join()
    part = tmp_path / "f5.bin.part"
    assert not (tmp_path / "f5.bin").exists()
    assert not part.exists() or FILES["f5.bin"].startswith(part.read_bytes())


def test_small_documents_are_fetched_whole_within_their_limit(server: FileServer) -> None:
    clock = FakeClock()
    server.faults.statuses["/f0.bin"] = [503]
    assert (
        fetch.fetch_small(server.url("f0.bin"), limit=1 << 20, sleep=clock.sleep) == FILES["f0.bin"]
    )
    assert len(clock.slept) == 1
    with pytest.raises(DownloadCorrupt, match="limit"):
        fetch.fetch_small(server.url("f1.bin"), limit=1000)
    server.faults.statuses["/f2.bin"] = [403]
    with pytest.raises(DownloadRefused, match="HTTP 403"):
        fetch.fetch_small(server.url("f2.bin"), limit=1 << 20)
    server.faults.statuses["/f3.bin"] = [500, 500]
    with pytest.raises(DownloadFailed, match="2 attempts failed, the last: HTTP 500"):
        fetch.fetch_small(server.url("f3.bin"), limit=1 << 20, attempts=2, sleep=clock.sleep)


def test_durations_and_bad_command_lines() -> None:
    assert [fetch._duration(s) for s in (5, 125, 7300)] == ["5s", "2m05s", "2h01m"]
    with pytest.raises(SystemExit) as exit_info:
        fetch.main(["http://127.0.0.1:9/x"])  # no --sha256, --size, -o
    assert exit_info.value.code == 2
    with pytest.raises(UsageError, match="exactly one of dest and open_sink"):
        DownloadTask(url="http://x/", size=1, sha256="0" * 64)
    with pytest.raises(UsageError, match="at least 1"):
        ParallelDownloader(concurrency=0)

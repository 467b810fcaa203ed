"""The node's parallel downloader: many files at once, in priority order, within one
bandwidth limit, each hashed while its bytes arrive.

Plain Python, threads and requests (no Django, no asyncio): `concurrency` worker threads,
each with its own `requests.Session`, take work from one priority queue (higher `priority`
first: the manifest and executables before the rest, then the order given). A global token
bucket, shared by every connection, holds the total rate to `limit_bps`.

Each file goes into a `Sink` (`FileSink`: `<dest>.part`, renamed into place once its SHA-256
is right; `updates.engine.parts.StagedFile`: straight into the engine's staging) that hashes
the bytes as they arrive, in order, even when a large file comes as parallel ranges. So:

- a cut connection resumes where its bytes end (`Range`, guarded by `If-Range` with the
  file's strong ETag, or its quoted SHA-256: the dashboard's ETag), and a server that answers
  a resume with the whole file (it changed) starts the file over: a changed file is never
  spliced onto an old one;
- transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with
  exponential backoff and jitter; `attempts` bounds the failures in a row that bring no new
  byte, so a flaky link that keeps making progress is never given up on;
- a refusal (401, 403, 404, 410) or a file whose bytes are wrong (size, SHA-256) stops
  everything at once: every other transfer is abandoned and the error names the file and
  the cause (`DownloadRefused`, `DownloadCorrupt`, `DownloadFailed` of workers.download).

A file of at least `split_bytes` is fetched as up to `concurrency` parallel ranges once the
server has answered a first range with 206 (a server that ignores ranges just sends it whole).

Progress (bytes, rate, ETA) goes to `progress(Progress)` at most every `progress_interval`
seconds and once at the end; `TerminalProgress` draws it as a bar on a TTY and stays quiet
otherwise. Clock, sleep and randomness are injectable, so tests need no wall time.

`python -m workers.fetch` fetches files from the command line (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import requests
import urllib3

from updates.engine.errors import EngineError, ManifestInvalid, UsageError
from updates.engine.parts import HashedFile
from workers.download import DownloadCorrupt, DownloadFailed, DownloadRefused

log = logging.getLogger("themis.agent.fetch")

KiB, MiB = 1 << 10, 1 << 20
CHUNK_BYTES = 256 * KiB
# The smallest range worth a connection of its own.
MIN_SPLIT_BYTES = 4 * MiB
REFUSED = frozenset({401, 403, 404, 410})
PRIORITY_MANIFEST = 100
PRIORITY_EXECUTABLE = 50
PRIORITY_DEFAULT = 0


def priority_for(path: str, mode: int = 0o644) -> int:
    """The manifest first, executables (any x bit, or under bin/ or sbin/) next, then the rest."""
    if path in {"manifest.json", "manifest.json.p7s"}:
        return PRIORITY_MANIFEST
    top = path.split("/", 1)[0]
    if mode & 0o111 or top in {"bin", "sbin"}:
        return PRIORITY_EXECUTABLE
    return PRIORITY_DEFAULT


# --------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """Where one file's bytes go; hashes them in order as they arrive."""

    @property
    def held(self) -> int:
        """Bytes held as a contiguous prefix: where a resumed request starts."""
        ...

    def write_at(self, offset: int, data: bytes) -> None: ...

    def truncate(self, length: int) -> None:
        """Keep only the first `length` bytes (0: start over)."""
        ...

    def commit(self) -> None:
        """Every byte is there: check size and SHA-256 (ManifestInvalid if wrong) and keep it."""
        ...

    def discard(self) -> None:
        """Drop every byte: the file is bad, or nothing of it is worth keeping."""
        ...

    def close(self) -> None:
        """Stop without committing; a sink may keep its prefix for a later resume."""
        ...


class FileSink(HashedFile):
    """`<dest>.part`, renamed to `dest` once complete and right. A `.part` left by an
    earlier run is resumed from (its bytes are hashed first); a wrong file leaves nothing."""

    def __init__(self, dest: Path, *, size: int, sha256: str, name: str = "") -> None:
        self.dest = Path(dest)
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.part, flags, 0o644)
        try:
            have = os.fstat(fd).st_size
            if have > size:  # longer than the file: cannot be its prefix
                os.ftruncate(fd, 0)
                have = 0
            super().__init__(fd, size=size, sha256=sha256, name=name or self.dest.name, held=have)
        except BaseException:
            os.close(fd)
            raise
        self._closed = False

    def commit(self) -> None:
        try:
            self.check()
        except ManifestInvalid:
            self.discard()
            raise
        os.fsync(self.fd)
        self._close_fd()
        os.replace(self.part, self.dest)
        _fsync_dir(self.dest.parent)

    def discard(self) -> None:
        self._close_fd()
        self.part.unlink(missing_ok=True)

    def close(self) -> None:
        if self._closed:
            return
        held = self.held
        if not held:
            self.discard()  # nothing to resume from: leave nothing
            return
        self.truncate(held)  # bytes ahead of the prefix cannot be trusted to resume
        os.fsync(self.fd)
        self._close_fd()

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DownloadTask:
    """One file to fetch: into `dest` (a FileSink), or into the sink `open_sink` makes."""

    url: str
    size: int
    sha256: str
    dest: Path | None = None
    open_sink: Callable[[], Sink] | None = None
    priority: int = PRIORITY_DEFAULT
    name: str = ""

    def __post_init__(self) -> None:
        if (self.dest is None) == (self.open_sink is None):
            raise UsageError("download task: give exactly one of dest and open_sink")
        if self.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise UsageError(f"download task {self.label}: needs a size and a hex SHA-256")

    @property
    def label(self) -> str:
        return self.name or (self.dest.name if self.dest is not None else self.url)

    def sink(self) -> Sink:
        if self.open_sink is not None:
            return self.open_sink()
        assert self.dest is not None
        return FileSink(self.dest, size=self.size, sha256=self.sha256, name=self.label)


@dataclass(frozen=True)
class Progress:
    """Where a run stands: bytes (resumed bytes count as done), rate, ETA, files."""

    done: int
    total: int
    rate: float  # bytes per second over the last few seconds
    eta: float | None  # seconds; None while the rate is unknown
    files_done: int
    files_total: int


@dataclass
class DownloadStats:
    files: int = 0
    bytes_fetched: int = 0  # received over the network in this run
    bytes_resumed: int = 0  # already held when the run began
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # files in the order they completed


# ------------------------------------------------------------------ bandwidth limit


class TokenBucket:
    """A rate limit shared by every connection: `take(n)` returns once n bytes may pass.

    Tokens accrue at `rate` per second up to `burst`. A taker that overdraws sleeps off its
    debt while holding the bucket, so the others queue behind it: the total never runs ahead
    of the rate, whatever the number of connections (and an injected clock that only moves
    when sleep is called sees exactly the time the limit needs)."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise UsageError(f"bandwidth limit: {rate} must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(CHUNK_BYTES, rate / 20))
        self.clock, self.sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, amount: int) -> float:
        """Wait until `amount` bytes may pass; returns the seconds waited."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= amount
            if self._tokens >= 0:
                return 0.0
            wait = -self._tokens / self.rate
            self.sleep(wait)
            return wait


# ----------------------------------------------------------------------- the meter


class _Meter:
    WINDOW = 3.0

    def __init__(
        self,
        total: int,
        files_total: int,
        clock: Callable[[], float],
        report: Callable[[Progress], None] | None,
        interval: float,
    ) -> None:
        self.total, self.files_total, self.clock = total, files_total, clock
        self.report, self.interval = report, interval
        self.done = self.files_done = 0
        self.fetched = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._last_report = -math.inf

    def add(self, amount: int, *, fetched: bool = True, file_done: bool = False) -> None:
        snapshot = None
        with self._lock:
            self.done += amount
            if fetched and amount > 0:
                self.fetched += amount
            if file_done:
                self.files_done += 1
            now = self.clock()
            self._samples.append((now, self.fetched))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
                self._samples.popleft()
            if self.report is not None and now - self._last_report >= self.interval:
                self._last_report = now
                snapshot = self._snapshot(now)
        if snapshot is not None:
            self._emit(snapshot)

    def finish(self) -> None:
        if self.report is not None:
            with self._lock:
                snapshot = self._snapshot(self.clock())
            self._emit(snapshot)

    def _snapshot(self, now: float) -> Progress:
        rate = 0.0
        if self._samples:
            then, fetched_then = self._samples[0]
            if now > then:
                rate = (self.fetched - fetched_then) / (now - then)
        remaining = max(0, self.total - self.done)
        eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
        return Progress(self.done, self.total, rate, eta, self.files_done, self.files_total)

    def _emit(self, snapshot: Progress) -> None:
        assert self.report is not None
        try:
            self.report(snapshot)
        except Exception:  # a broken reporter never breaks a download
            log.warning("progress callback failed", exc_info=True)


# ----------------------------------------------------------------- the downloader


class _Transient(Exception):
    """Worth another try: the bytes received so far are kept."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Superseded(Exception):
    """The file started over (or the run stopped): this range's work is void."""


class _File:
    """One task's shared state: its sink, its ranges, what its server said."""

    def __init__(self, task: DownloadTask, index: int) -> None:
        self.task, self.index = task, index
        self.lock = threading.Lock()
        self.sink: Sink | None = None
        self.generation = 0
        self.pending = 1  # ranges not finished yet
        self.split_done = False
        self.etag = ""  # the server's strong ETag, once seen
        self.finished = False

    def if_range(self) -> str:
        return self.etag or f'"{self.task.sha256}"'


@dataclass
class _Range:
    file: _File
    start: int
    end: int  # exclusive
    generation: int
    pos: int = -1

    def __post_init__(self) -> None:
        if self.pos < 0:
            self.pos = self.start


class ParallelDownloader:
    """Fetches a set of DownloadTasks; `run()` returns when all are done or raises the
    first failure (naming the file) after every other transfer has stopped."""

    def __init__(
        self,
        *,
        concurrency: int = 4,
        limit_bps: float | None = None,
        headers: Mapping[str, str] | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
        split_bytes: int | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 0.25,
        on_file_done: Callable[[DownloadTask], None] | None = None,
    ) -> None:
        if concurrency < 1 or attempts < 1:
            raise UsageError("downloader: concurrency and attempts must be at least 1")
        self.concurrency, self.attempts = concurrency, attempts
        self.headers = dict(headers or {})
        self.backoff, self.max_backoff, self.timeout = backoff, max_backoff, timeout
        self.chunk_bytes, self.split_bytes = chunk_bytes, split_bytes
        self.session_factory, self.clock = session_factory, clock
        self._cancel = threading.Event()
        self._sleep: Callable[[float], None] = sleep or self._interruptible_sleep
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.progress, self.progress_interval = progress, progress_interval
        self.on_file_done = on_file_done
        self.bucket = (
            TokenBucket(
                limit_bps, burst=max(chunk_bytes, limit_bps / 20), clock=clock, sleep=self._sleep
            )
            if limit_bps
            else None
        )
        self.stats = DownloadStats()
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, int, int, _Range]] = []
        self._counter = itertools.count()
        self._active = 0
        self._error: BaseException | None = None
        self._failed: _File | None = None
        self._inflight: set[urllib3.HTTPResponse] = set()
        self._meter: _Meter | None = None

    def _interruptible_sleep(self, seconds: float) -> None:
        self._cancel.wait(seconds)  # a cancelled run stops waiting at once

    def cancel(self) -> None:
        """Stop the run from another thread; run() raises DownloadFailed."""
        self._fail(None, DownloadFailed("download cancelled"))

    # ---- the run

    def run(self, tasks: Iterable[DownloadTask]) -> DownloadStats:
        started = self.clock()
        files = [_File(task, index) for index, task in enumerate(tasks)]
        wanted = [f for f in files if not self._already_there(f)]
        self._meter = _Meter(
            sum(f.task.size for f in files),
            len(files),
            self.clock,
            self.progress,
            self.progress_interval,
        )
        self._meter.add(sum(f.task.size for f in files if f.finished), fetched=False)
        self._meter.files_done = len(files) - len(wanted)
        for file in wanted:
            self._push(_Range(file, 0, file.task.size, 0))
        splittable = self.split_bytes is not None and any(
            f.task.size >= max(self.split_bytes, 2 * MIN_SPLIT_BYTES) for f in wanted
        )
        count = self.concurrency if splittable else min(self.concurrency, max(1, len(wanted)))
        threads = [
            threading.Thread(target=self._worker, name=f"themis-fetch-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException as err:  # KeyboardInterrupt in the caller: stop the workers
            self._fail(None, err)
            for thread in threads:
                thread.join()
        self._close_sinks(wanted)
        self.stats.seconds = self.clock() - started
        self.stats.bytes_fetched = self._meter.fetched
        if self._error is not None:
            raise self._error
        self._meter.finish()
        return self.stats

    def _already_there(self, file: _File) -> bool:
        """A file already at its destination with the right bytes (a redelivered job)."""
        dest = file.task.dest
        if dest is None or file.task.open_sink is not None:
            return False
        try:
            if dest.stat().st_size != file.task.size or _sha256_of(dest) != file.task.sha256:
                return False
        except OSError:
            return False
        file.finished = True
        self.stats.files += 1
        return True

    def _push(self, part: _Range) -> None:
        task = part.file.task
        key = (-task.priority, part.file.index, part.start, next(self._counter), part)
        with self._cond:
            heapq.heappush(self._queue, key)
            self._cond.notify()

    def _worker(self) -> None:
        session = self.session_factory()
        try:
            while True:
                with self._cond:
                    while not self._queue and self._active and not self._cancel.is_set():
                        self._cond.wait()
                    if self._cancel.is_set() or not self._queue:
                        self._cond.notify_all()
                        return
                    part = heapq.heappop(self._queue)[-1]
                    self._active += 1
                try:
                    self._fetch_range(session, part)
                except BaseException as err:
                    self._fail(part.file, err)
                finally:
                    with self._cond:
                        self._active -= 1
                        self._cond.notify_all()
        finally:
            session.close()

    def _fail(self, file: _File | None, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = _named(file, err)
                self._failed = file
            self._cancel.set()
            # "At once": a read blocked on a slow server is woken, not waited out.
            for raw in list(self._inflight):
                _shutdown(raw)
            self._cond.notify_all()

    def _close_sinks(self, files: Sequence[_File]) -> None:
        for file in files:
            with file.lock:
                sink, file.sink = file.sink, None
            if sink is None or file.finished:
                continue
            try:
                if file is self._failed and isinstance(self._error, ManifestInvalid):
                    sink.discard()  # not the file's bytes: nothing worth resuming
                else:
                    sink.close()
            except Exception:
                log.warning("could not close the download of %s", file.task.label, exc_info=True)

    # ---- one range, with retries

    def _fetch_range(self, session: requests.Session, part: _Range) -> None:
        failures = 0
        while part.pos < part.end or part.end == part.start:
            if self._cancel.is_set():
                return
            if part.generation != part.file.generation:
                return  # the file started over elsewhere
            before = part.pos
            try:
                self._request(session, part)
                break
            except _Superseded:
                return
            except _Transient as err:
                failures = 1 if part.pos > before else failures + 1
                if failures >= self.attempts:
                    raise DownloadFailed(
                        f"{part.file.task.label}: {failures} attempts in a row failed,"
                        f" the last: {err}"
                    ) from err
                with self._cond:
                    self.stats.retries += 1
                delay = self._backoff(failures, err.retry_after)
                log.warning("%s: %s; retrying in %.1fs", part.file.task.label, err, delay)
                self._sleep(delay)
        self._range_done(part)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Exponential, capped, with jitter (half fixed, half random) so nodes that failed
        together do not come back together; a server's Retry-After is a floor."""
        delay = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        delay = delay / 2 + self.rng.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def _range_done(self, part: _Range) -> None:
        file = part.file
        with file.lock:
            if part.generation != file.generation:
                return
            file.pending -= 1
            if file.pending:
                return
            sink = file.sink
            file.sink = None
        assert sink is not None
        try:
            sink.commit()
        except BaseException:
            with file.lock:
                file.sink = sink  # _close_sinks discards it
            raise
        file.finished = True
        assert self._meter is not None
        self._meter.add(0, file_done=True)
        with self._cond:
            self.stats.files += 1
            self.stats.order.append(file.task.label)
        if self.on_file_done is not None:
            self.on_file_done(file.task)  # its error stops the run, naming the file

    # ---- one request

    def _open_sink(self, file: _File) -> Sink:
        with file.lock:
            if file.sink is None:
                file.sink = file.task.sink()
                held = file.sink.held
                if held:
                    assert self._meter is not None
                    self._meter.add(held, fetched=False)
                    self.stats.bytes_resumed += held
            return file.sink

    def _request(self, session: requests.Session, part: _Range) -> None:
        file, task = part.file, part.file.task
        sink = self._open_sink(file)
        if part.start == 0 and part.pos == 0 and not file.split_done:
            part.pos = sink.held  # resume the whole file from what an earlier run left
        if part.pos >= part.end:
            return
        # Identity: the bytes hashed and resumed are the file's, never a compressed stream.
        headers = {"Accept-Encoding": "identity", **self.headers}
        want_end = self._probe_end(file, part)
        ranged = part.pos > 0 or want_end < task.size
        if ranged:
            headers["Range"] = f"bytes={part.pos}-{want_end - 1}"
            headers["If-Range"] = file.if_range()
        with self._cond:
            self.stats.requests += 1
        try:
            response = session.get(task.url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err
        with response:
            with self._cond:
                if self._cancel.is_set():
                    raise _Superseded
                self._inflight.add(response.raw)
            try:
                self._accept(response, part, ranged, want_end)
                self._receive(response, part)
            finally:
                with self._cond:
                    self._inflight.discard(response.raw)
        if part.pos < part.end:
            raise _Transient(f"connection closed at byte {part.pos} of {task.size}")

    def _probe_end(self, file: _File, part: _Range) -> int:
        """Where the first request of a file that may be split stops: a first range, to see
        whether the server answers ranges at all before others are asked for."""
        size = file.task.size
        if (
            file.split_done
            or self.split_bytes is None
            or self.concurrency < 2
            or size - part.pos < max(self.split_bytes, 2 * MIN_SPLIT_BYTES)
            or part.end != size
        ):
            return part.end
        pieces = min(self.concurrency, (size - part.pos) // MIN_SPLIT_BYTES)
        return part.pos + math.ceil((size - part.pos) / pieces)

    def _accept(
        self, response: requests.Response, part: _Range, ranged: bool, want_end: int
    ) -> None:
        file, task = part.file, part.file.task
        status = response.status_code
        if status in REFUSED:
            raise DownloadRefused(f"{task.label}: HTTP {status} from {task.url}: {_text(response)}")
        if status in (408, 429) or status >= 500:
            raise _Transient(f"HTTP {status}", _retry_after(response))
        if status == 416:
            self._restart(part)
            raise _Transient("the server refused the range asked for; starting the file over")
        etag = response.headers.get("ETag", "")
        if etag and not etag.startswith("W/"):
            file.etag = etag
        if status == 200:
            length = _int_header(response, "Content-Length")
            if length is not None and length != task.size:
                raise DownloadCorrupt(
                    f"{task.label}: the server has {length} bytes, {task.size} were expected"
                )
            if ranged:
                # The range was ignored, or If-Range found the file changed: the body is
                # the whole file, so the file starts over, never spliced.
                self._restart(part)
            file.split_done = True
            return
        if status != 206:
            raise DownloadFailed(f"{task.label}: unexpected HTTP {status} from {task.url}")
        first, last, total = _content_range(response, task.label)
        if total is not None and total != task.size:
            raise DownloadCorrupt(
                f"{task.label}: the server has {total} bytes, {task.size} were expected"
            )
        if first != part.pos or last >= part.end:
            self._restart(part)
            raise _Transient(f"the server answered bytes {first}-{last}, not from {part.pos}")
        if not file.split_done:
            file.split_done = True
            if want_end < part.end:
                self._split(part, want_end)

    def _split(self, part: _Range, cut: int) -> None:
        """The server answers ranges: the rest of the file goes to other connections."""
        file = part.file
        rest = part.end - cut
        pieces = max(1, min(self.concurrency - 1, rest // MIN_SPLIT_BYTES))
        step = math.ceil(rest / pieces)
        new = [
            _Range(file, start, min(start + step, part.end), part.generation)
            for start in range(cut, part.end, step)
        ]
        with file.lock:
            if part.generation != file.generation:
                return
            part.end = cut
            file.pending += len(new)
        for piece in new:
            self._push(piece)

    def _restart(self, part: _Range) -> None:
        """The file starts over from byte 0 on this range; its other ranges are void."""
        file = part.file
        with file.lock:
            file.generation += 1
            dropped = file.sink.held if file.sink is not None else 0
            if file.sink is not None:
                file.sink.truncate(0)
            file.pending = 1
            file.split_done = True
            part.start, part.pos, part.end = 0, 0, file.task.size
            part.generation = file.generation
        if dropped:
            assert self._meter is not None
            self._meter.add(-dropped, fetched=False)

    def _receive(self, response: requests.Response, part: _Range) -> None:
        raw = response.raw
        file = part.file
        assert self._meter is not None
        while part.pos < part.end:
            if self._cancel.is_set():
                raise _Superseded
            try:
                chunk = raw.read1(min(self.chunk_bytes, part.end - part.pos), decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as err:
                raise _Transient(f"connection lost at byte {part.pos}: {err}") from err
            if not chunk:
                return
            if self.bucket is not None:
                self.bucket.take(len(chunk))
            with file.lock:
                if part.generation != file.generation or file.sink is None:
                    raise _Superseded
                file.sink.write_at(part.pos, chunk)
            part.pos += len(chunk)
            self._meter.add(len(chunk))


def _named(file: _File | None, err: BaseException) -> BaseException:
    """The run's error, naming the file and the cause."""
    if isinstance(err, EngineError) or file is None:
        if isinstance(err, ManifestInvalid) and not isinstance(err, DownloadCorrupt):
            corrupt = DownloadCorrupt(str(err))  # a sink's size or SHA-256 check
            corrupt.__cause__ = err
            return corrupt
        return err
    failed = DownloadFailed(f"{file.task.label}: {type(err).__name__}: {err}")
    failed.__cause__ = err
    return failed


def _shutdown(raw: urllib3.HTTPResponse) -> None:
    # Already released or closed: nothing is blocked on it.
    with contextlib.suppress(ValueError, RuntimeError, OSError):
        raw.shutdown()


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _text(response: requests.Response) -> str:
    try:
        return response.text[:200].strip()
    except Exception:
        return ""


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")


def _content_range(response: requests.Response, label: str) -> tuple[int, int, int | None]:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        raise DownloadFailed(f"{label}: a 206 answer without a usable Content-Range")
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


# --------------------------------------------------------------- small documents


def fetch_small(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    limit: int,
    session: requests.Session | None = None,
    attempts: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> bytes:
    """A small document (a manifest, its signature) of at most `limit` bytes, whole, with
    the same retry rules as the downloader. Refusals raise DownloadRefused."""
    own = session is None
    session = session or requests.Session()
    rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
    try:
        for attempt in range(1, attempts + 1):
            try:
                return _get_small(session, url, dict(headers or {}), limit, timeout)
            except _Transient as err:
                if attempt == attempts:
                    raise DownloadFailed(
                        f"{url}: {attempts} attempts failed, the last: {err}"
                    ) from err
                delay = min(30.0, backoff * 2 ** (attempt - 1))
                delay = delay / 2 + rng.uniform(0, delay / 2)
                if err.retry_after is not None:
                    delay = max(delay, min(err.retry_after, 30.0))
                sleep(delay)
        raise AssertionError("unreachable")
    finally:
        if own:
            session.close()


def _get_small(
    session: requests.Session, url: str, headers: dict[str, str], limit: int, timeout: float
) -> bytes:
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as err:
        raise _Transient(f"{type(err).__name__}: {err}") from err
    with response:
        status = response.status_code
        if status in REFUSED:
            raise DownloadRefused(f"{url}: HTTP {status}: {_text(response)}")
        if status in (408, 429) or status >= 500:
            raise _Transient(f"HTTP {status}", _retry_after(response))
        if status != 200:
            raise DownloadFailed(f"{url}: unexpected HTTP {status}")
        length = _int_header(response, "Content-Length")
        if length is not None and length > limit:
            raise DownloadCorrupt(f"{url}: {length} bytes exceed the {limit}-byte limit")
        body = bytearray()
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise DownloadCorrupt(f"{url}: more than the {limit}-byte limit")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
            raise _Transient(f"connection lost: {err}") from err
        if length is not None and len(body) != length:
            raise _Transient(f"connection closed after {len(body)} of {length} bytes")
        return bytes(body)


# ---------------------------------------------------------------- on a terminal


class TerminalProgress:
    """A one-line progress bar on a TTY (bytes, rate, ETA); says nothing otherwise."""

    def __init__(self, stream: IO[str] | None = None, *, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + render_progress(progress, self.width))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def render_progress(progress: Progress, width: int = 30) -> str:
    share = progress.done / progress.total if progress.total else 1.0
    filled = min(width, int(share * width))
    eta = "--" if progress.eta is None else _duration(progress.eta)
    return (
        f"[{'#' * filled}{' ' * (width - filled)}] {share * 100:5.1f}%"
        f" {progress.done / MiB:,.1f}/{progress.total / MiB:,.1f} MiB"
        f" {progress.rate / MiB:6.1f} MiB/s ETA {eta}"
        f" ({progress.files_done}/{progress.files_total} files)"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# ------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.fetch`: fetch files in parallel, with a bar on a terminal.

        python -m workers.fetch URL --sha256 HEX --size N -o FILE [options]
        python -m workers.fetch --list tasks.json [options]

    `tasks.json` is a list of {"url", "sha256", "size", "dest", "priority"?}. Exit 0 when
    every file is there and right; otherwise one line on stderr naming the file and the
    cause, and the engine's exit code (12 for a wrong file, 1 for a failed download)."""
    parser = argparse.ArgumentParser(prog="python -m workers.fetch")
    parser.add_argument("url", nargs="?")
    parser.add_argument("--sha256")
    parser.add_argument("--size", type=int)
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--list", type=Path, help="a JSON list of tasks")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit-mbps", type=float, help="global limit, MB/s (10^6 bytes)")
    parser.add_argument("--split-mb", type=float, default=32, help="ranges for files this big")
    parser.add_argument("--token", help="sent as Authorization: Bearer")
    args = parser.parse_args(argv)
    try:
        tasks = _cli_tasks(args)
    except (OSError, ValueError, KeyError, TypeError, UsageError) as err:
        parser.error(str(err))
    bar = TerminalProgress()
    downloader = ParallelDownloader(
        concurrency=args.concurrency,
        limit_bps=args.limit_mbps * 1e6 if args.limit_mbps else None,
        headers={"Authorization": f"Bearer {args.token}"} if args.token else None,
        split_bytes=int(args.split_mb * MiB),
        progress=bar,
    )
    try:
        stats = downloader.run(tasks)
    except EngineError as err:
        bar.close()
        print(f"fetch: {err.code}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        bar.close()
        print("fetch: interrupted", file=sys.stderr)
        return 130
    bar.close()
    if not bar.enabled:
        print(
            json.dumps(
                {
                    "files": stats.files,
                    "bytes_fetched": stats.bytes_fetched,
                    "bytes_resumed": stats.bytes_resumed,
                    "seconds": round(stats.seconds, 3),
                }
            )
        )
    return 0


def _cli_tasks(args: argparse.Namespace) -> list[DownloadTask]:
    if args.list is not None:
        items = json.loads(args.list.read_text())
        if not isinstance(items, list):
            raise ValueError("--list: expected a JSON list")
        return [
            DownloadTask(
                url=str(item["url"]),
                size=int(item["size"]),
                sha256=str(item["sha256"]).lower(),
                dest=Path(str(item["dest"])),
                priority=int(item.get("priority", 0)),
            )
            for item in items
        ]
    if not (args.url and args.sha256 and args.size is not None and args.output):
        raise ValueError("give URL, --sha256, --size and -o, or --list")
    return [
        DownloadTask(url=args.url, size=args.size, sha256=args.sha256.lower(), dest=args.output)
    ]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

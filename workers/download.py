"""Agent side of artifact delivery: a resumable, checked bundle download.

Plain Python and requests, no Django: the node agent has no database and no
dashboard settings. Bytes go to `<dest>.part`; an interrupted download
continues from what is already there (`Range: bytes=<have>-`, guarded by
`If-Range` so a changed file is never spliced onto an old one). The finished
file must match the release's SHA-256 before it is renamed into place; the
signature is verified afterwards by the engine, as for any bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3

from updates.engine.errors import EngineError, ManifestInvalid, UsageError

log = logging.getLogger("themis.agent.download")

CHUNK_BYTES = 1 << 20
MAX_BACKOFF_SECONDS = 30.0

Progress = Callable[[int, int], None]


class DownloadFailed(EngineError):
    """The bundle could not be fetched (network, server error, retries used up)."""

    code = "DOWNLOAD_FAILED"


class DownloadRefused(DownloadFailed):
    """The dashboard refused the download (401/403/404/410): retrying cannot help."""

    code = "DOWNLOAD_REFUSED"


class DownloadCorrupt(ManifestInvalid):
    """What arrived is not the release's bundle (SHA-256 or size differs).
    Nothing is kept: the partial file is deleted."""


class _Retry(Exception):
    """A transient failure: the bytes received so far are kept for the next try."""


def download_resumable(
    url: str,
    token: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    progress: Progress | None = None,
    session: requests.Session | None = None,
    attempts: int = 5,
    timeout: float = 30,
    backoff: float = 0.5,
) -> Path:
    """Download `url` to `dest` and return `dest`, checked against `sha256`.

    `attempts` bounds consecutive failures that bring no new bytes: a flaky
    link that keeps making progress is never given up on. `progress(done,
    total)` is called after every chunk (total 0 when unknown); throttle it if
    it reports over the network.
    """
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise UsageError(f"download: expected a hex SHA-256, got {sha256!r}")
    dest = Path(dest)
    if dest.is_file() and _digest(dest) == sha256:
        return dest  # a redelivered task finds its bundle already downloaded
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    fetch = _Fetch(url, token, part, sha256, size, progress, timeout)
    own_session = session is None
    session = session or requests.Session()
    try:
        _with_retries(fetch, session, attempts=attempts, backoff=backoff)
    except DownloadCorrupt:
        part.unlink(missing_ok=True)  # not the release's bytes: nothing worth resuming
        raise
    finally:
        if own_session:
            session.close()
    _commit(part, dest, sha256)
    return dest


def _with_retries(
    fetch: _Fetch, session: requests.Session, *, attempts: int, backoff: float
) -> None:
    failures = 0
    while True:
        had = _size(fetch.part)
        try:
            fetch.once(session)
            return
        except _Retry as err:
            failures = 1 if _size(fetch.part) > had else failures + 1
            if failures >= attempts:
                raise DownloadFailed(
                    f"download of {fetch.url} failed {failures} times in a row: {err}"
                ) from err
            delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
            log.warning("download interrupted (%s); retrying in %.1fs", err, delay)
            time.sleep(delay)


class _Fetch:
    """One download's fixed inputs; `once()` makes a single HTTP request."""

    def __init__(
        self,
        url: str,
        token: str,
        part: Path,
        sha256: str,
        size: int | None,
        progress: Progress | None,
        timeout: float,
    ) -> None:
        self.url, self.token, self.part, self.sha256 = url, token, part, sha256
        self.size, self.progress, self.timeout = size, progress, timeout

    def once(self, session: requests.Session) -> None:
        have = _size(self.part)
        if self.size is not None and have >= self.size:
            if have == self.size:
                return  # complete already; the hash check decides
            self.part.unlink()  # longer than the release: cannot be it
            have = 0
        headers = {"Authorization": f"Bearer {self.token}"}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = f'"{self.sha256}"'
        try:
            response = session.get(self.url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as err:
            raise _Retry(f"{type(err).__name__}: {err}") from err
        with response:
            offset, total = self._accept(response, have)
            if offset is None:
                return
            self._receive(response, offset, total)

    def _accept(self, response: requests.Response, have: int) -> tuple[int | None, int | None]:
        """Where the body starts in the file (None: nothing to fetch) and the file's size."""
        status = response.status_code
        if status == 416 and have:
            if _content_range_total(response) == have:
                return None, have  # we already hold every byte
            self.part.unlink(missing_ok=True)
            raise _Retry("server refused our resume point; starting over")
        if status in (401, 403, 404, 410):
            raise DownloadRefused(f"{self.url}: HTTP {status}: {response.text[:200].strip()}")
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}")
        if status == 200:
            total = _int_header(response, "Content-Length")
            offset = 0  # a full body: the server ignored or refused the range
        elif status == 206:
            offset, total = _content_range(response)
            if offset != have:
                self.part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {offset}, we asked for {have}")
        else:
            raise DownloadFailed(f"{self.url}: unexpected HTTP {status}")
        if self.size is not None and total is not None and total != self.size:
            raise DownloadCorrupt(
                f"download {self.url}: server has {total} bytes, the release has {self.size}"
            )
        return offset, total

    def _receive(self, response: requests.Response, offset: int, total: int | None) -> None:
        expected = self.size if self.size is not None else total
        done = offset
        # read1 hands over whatever arrived: on a cut connection no received
        # byte is lost in a buffer, so the next request resumes exactly there.
        raw = response.raw
        with open(self.part, "ab" if offset else "wb") as out:
            try:
                while chunk := _read(raw, done):
                    done += len(chunk)
                    if expected is not None and done > expected:
                        raise DownloadCorrupt(f"download {self.url}: more than {expected} bytes")
                    out.write(chunk)
                    if self.progress:
                        self.progress(done, expected or 0)
            finally:
                # Whatever was written counts for the resume, even after a crash.
                out.flush()
                os.fsync(out.fileno())
        if expected is not None and done < expected:
            raise _Retry(f"connection closed at byte {done} of {expected}")


def _read(raw: urllib3.HTTPResponse, done: int) -> bytes:
    try:
        return raw.read1(CHUNK_BYTES, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise _Retry(f"connection lost at byte {done}: {err}") from err


def _commit(part: Path, dest: Path, sha256: str) -> None:
    """Check the hash, then rename into place; a mismatch leaves no file behind."""
    digest = _digest(part)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadCorrupt(
            f"downloaded bundle {dest.name}: SHA-256 {digest} differs from the release's {sha256}"
        )
    os.replace(part, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename survives a power cut
    finally:
        os.close(dir_fd)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name, "")
    return int(value) if value.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _content_range(response: requests.Response) -> tuple[int, int | None]:
    """(first byte, full size) of a 206 answer."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        raise DownloadFailed(f"206 without a usable Content-Range: {response.headers!r}")
    first, _last, total = match.groups()
    return int(first), None if total == "*" else int(total)


def _content_range_total(response: requests.Response) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None

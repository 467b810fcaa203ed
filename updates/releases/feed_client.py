"""HTTP for release feeds: list what a source offers, stream one bundle. No Django, no database.

Two kinds of source (docs/release-feeds.md):

- `github`: `GET <api>/repos/<owner>/<repo>/releases`, the GitHub REST API's release list,
  read page by page (`Link: <...>; rel="next"`, on the feed's own origin only, at most
  MAX_PAGES pages; only the first request is conditional); each release's bundle is the
  asset named `<product>-<version>.tar.zst` (or `.tar`, or another `<product>-*.tar[.zst]`),
  downloaded from its `browser_download_url`.
- `index`: `GET <url>?since=<hash>`, a JSON index of `{version, url, sha256, size,
  manifest_sha256}` entries; the server answers in full or only the entries after `since`.

A listing's first request is conditional when it can be (`If-None-Match`,
`If-Modified-Since`). Every request goes through the notifications' egress guard (public
addresses only unless an operator allowed a network; https unless http is allowed), ignores
proxies from the environment and follows redirects by hand (at most 5, each hop checked; the
token only ever goes to the feed's own origin). Answers are read with caps; what a server says
is never trusted to be well-formed: an odd entry is left out with a note, an odd answer is a
FeedError.

The rate-limit and retry rules are plain functions here (`rate_limit`, `retry_after`,
`backoff_seconds`, `server_wait_until`), the clock is injected.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit

import requests

from updates.notifications.egress import EgressPolicy, EgressRefused, GuardedAdapter, check_url

LIST_MAX_BYTES = 8 << 20
MAX_ENTRIES = 1000
MAX_REDIRECTS = 5
# A GitHub release list comes a page at a time (`Link: <...>; rel="next"`): a poll reads at
# most MAX_PAGES pages of PER_PAGE releases (GitHub's most; a URL's own `per_page` is kept).
MAX_PAGES = 10
PER_PAGE = 100
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECTS = frozenset({301, 302, 303, 307, 308})
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
INDEX_HASH = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
CHANNELS = frozenset({"stable", "beta", "hotfix"})
# An ETag or Last-Modified worth keeping: printable ASCII, bounded (else it is not sent back).
HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,512}")
NOTE_MAX = 200


class FeedError(Exception):
    """A request to a feed failed. `transient`: worth retrying after a backoff (connection
    errors, 5xx, rate limits); `retry_at`: the server's own wish (Retry-After); `resync`:
    the server and we disagree about the state we hold, so the next poll starts afresh."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_at: datetime | None = None,
        rate: RateLimit | None = None,
        rate_limited: bool = False,
        resync: bool = False,
        out_of_time: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status
        self.retry_at = retry_at
        self.rate = rate
        self.rate_limited = rate_limited
        self.resync = resync  # forget the sync state: the next poll asks for everything
        self.out_of_time = out_of_time  # the poll's time is up: no retry within it


@dataclass(frozen=True)
class RateLimit:
    """X-RateLimit-Limit / -Remaining / -Reset of an answer (None: not sent)."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: datetime | None = None

    @property
    def known(self) -> bool:
        return self.limit is not None or self.remaining is not None or self.reset_at is not None


@dataclass(frozen=True)
class FeedEntry:
    """One bundle a feed offers."""

    version: str
    name: str
    url: str
    size: int | None
    sha256: str | None
    manifest_sha256: str | None
    channel: str | None  # None: the feed's own channel
    fingerprint: str


@dataclass(frozen=True)
class Listing:
    """A feed's answer to a listing request."""

    status: int
    rate: RateLimit
    not_modified: bool = False
    entries: tuple[FeedEntry, ...] = ()
    ignored: tuple[str, ...] = ()  # why entries were left out
    etag: str = ""
    last_modified: str = ""
    index_hash: str = ""
    incremental: bool = False


@dataclass(frozen=True)
class FeedSource:
    """What a request needs to know of a feed."""

    kind: str  # "github" | "index"
    url: str
    product: str
    token: str = field(default="", repr=False)
    etag: str = ""
    last_modified: str = ""
    index_hash: str = ""


@dataclass(frozen=True)
class Backoff:
    """Seconds: the first step, the longest step, the longest a server may make us wait."""

    base: float
    cap: float
    max_wait: float


# ------------------------------------------------------------------ rules


def _digits(value: str | None, longest: int = 12) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > longest or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def rate_limit(headers: Mapping[str, str]) -> RateLimit:
    reset = _digits(headers.get("X-RateLimit-Reset"))
    reset_at = None
    if reset is not None:
        try:
            reset_at = datetime.fromtimestamp(reset, UTC)
        except (OverflowError, OSError, ValueError):
            reset_at = None
    return RateLimit(
        limit=_digits(headers.get("X-RateLimit-Limit"), 9),
        remaining=_digits(headers.get("X-RateLimit-Remaining"), 9),
        reset_at=reset_at,
    )


def retry_after(value: str | None, now: datetime) -> datetime | None:
    """Retry-After as a time: delta-seconds or an HTTP date; None when absent or malformed."""
    if value is None:
        return None
    seconds = _digits(value, 10)
    if seconds is not None:
        return now + timedelta(seconds=seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def backoff_seconds(failures: int, backoff: Backoff, rng: Callable[[], float]) -> float:
    """Exponential backoff with jitter: the step doubles per consecutive failure (up to the
    cap); the wait is half the step plus a random part of the other half."""
    doublings: int = min(max(failures, 1) - 1, 40)
    step = min(backoff.cap, backoff.base * float(1 << doublings))
    return step / 2 + min(max(rng(), 0.0), 1.0) * step / 2


def server_wait_until(
    now: datetime, *, retry_at: datetime | None, rate: RateLimit | None, max_wait: float
) -> datetime | None:
    """The earliest a server allows the next request: its Retry-After, and its rate limit's
    reset when no request is left; never more than `max_wait` seconds ahead."""
    wanted = [retry_at] if retry_at is not None and retry_at > now else []
    reset = rate.reset_at if rate is not None and rate.remaining == 0 else None
    if reset is not None and reset > now:
        wanted.append(reset)
    if not wanted:
        return None
    return min(max(wanted), now + timedelta(seconds=max_wait))


def fingerprint(*parts: object) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()


def note(text: str, limit: int = NOTE_MAX) -> str:
    """A server's words, safe to keep and show: printable, bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _header_value(value: str | None) -> str:
    return value if value is not None and HEADER_VALUE.fullmatch(value) else ""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


def _origin_name(url: str) -> str:
    """scheme://host[:port] of a URL, never its user info."""
    scheme = urlsplit(url).scheme.lower() or "?"
    return f"{note(scheme, 16)}://{note(_host(url), 300)}"


def with_per_page(url: str, per_page: int = PER_PAGE) -> str:
    """A GitHub release list URL asking for `per_page` releases a page, unless it says."""
    parts = urlsplit(url)
    if "per_page" in parse_qs(parts.query, keep_blank_values=True):
        return url
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"per_page": per_page})))


def with_since(url: str, since: str) -> str:
    """The index URL asking for the entries after `since`."""
    if not since:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"since": since})))


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 1 << 62:
        return None
    return value


def _http_url(value: Any, base: str) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 1000:
        return None
    try:
        url = urljoin(base, value)
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        return None
    return url


def _version(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value[1:] if value[:1] in {"v", "V"} and value[1:2].isdigit() else value
    return text if VERSION.fullmatch(text) else None


# ------------------------------------------------------------------ parsing


def parse_github(data: Any, *, product: str) -> tuple[list[FeedEntry], list[str]]:
    """Entries of a GitHub release list (newest first there; oldest first here)."""
    if not isinstance(data, list):
        raise FeedError("the answer is not a GitHub release list", transient=False)
    entries: list[FeedEntry] = []
    ignored: list[str] = []
    for position, release in enumerate(data[:MAX_ENTRIES]):
        if not isinstance(release, dict):
            ignored.append(f"release #{position}: not an object")
            continue
        if release.get("draft") is True:
            continue
        tag = release.get("tag_name")
        version = _version(tag)
        if version is None:
            ignored.append(note(f"release #{position}: tag {tag!r} is not a version"))
            continue
        asset = _bundle_asset(release.get("assets"), product=product, version=version)
        if asset is None:
            ignored.append(note(f"{version}: no {product} bundle among its assets"))
            continue
        name, url, size, raw = asset
        entries.append(
            FeedEntry(
                version=version,
                name=name,
                url=url,
                size=size,
                sha256=None,
                manifest_sha256=None,
                channel="beta" if release.get("prerelease") is True else None,
                fingerprint=fingerprint(
                    "github", raw.get("id"), raw.get("updated_at"), size, url, version
                ),
            )
        )
    entries.reverse()
    return entries, ignored


def _bundle_asset(
    assets: Any, *, product: str, version: str
) -> tuple[str, str, int, dict[str, Any]] | None:
    if not isinstance(assets, list):
        return None
    usable: list[tuple[int, str, str, int, dict[str, Any]]] = []
    for asset in assets[:100]:
        if not isinstance(asset, dict) or asset.get("state", "uploaded") != "uploaded":
            continue
        name = asset.get("name")
        size = _int(asset.get("size"))
        url = _http_url(asset.get("browser_download_url"), "")
        if not isinstance(name, str) or not ASSET_NAME.fullmatch(name) or size is None or not url:
            continue
        if not name.startswith(f"{product}-") or not name.endswith((".tar", ".tar.zst")):
            continue
        rank = {f"{product}-{version}.tar.zst": 0, f"{product}-{version}.tar": 1}.get(name, 2)
        usable.append((rank, name, url, size, asset))
    if not usable:
        return None
    _, name, url, size, raw = min(usable, key=lambda item: (item[0], item[1]))
    return name, url, size, raw


def parse_index(
    data: Any, *, base_url: str, product: str, sent_hash: str, body_sha256: str
) -> tuple[list[FeedEntry], list[str], str, bool]:
    """Entries, notes, the index's hash and whether the answer is incremental."""
    incremental = False
    index_hash = f"sha256:{body_sha256}"
    if isinstance(data, list):
        releases: Any = data
    elif isinstance(data, dict):
        if data.get("format", 1) != 1:
            raise FeedError(f"index format {note(repr(data.get('format')))}", transient=False)
        declared = data.get("product")
        if declared is not None and declared != product:
            raise FeedError(
                f"the index is for {note(repr(declared))}, not {product}", transient=False
            )
        if "hash" in data:
            if not isinstance(data["hash"], str) or not INDEX_HASH.fullmatch(data["hash"]):
                raise FeedError("the index's hash is malformed", transient=False)
            index_hash = data["hash"]
        since = data.get("since")
        if since not in (None, ""):
            if not sent_hash or since != sent_hash:
                raise FeedError(
                    "an incremental answer after an index state we never asked about",
                    transient=False,
                    resync=True,
                )
            incremental = True
        releases = data.get("releases")
    else:
        raise FeedError("the answer is not a release index", transient=False)
    if not isinstance(releases, list):
        raise FeedError("the index has no list of releases", transient=False)
    entries: list[FeedEntry] = []
    ignored: list[str] = []
    for position, item in enumerate(releases[:MAX_ENTRIES]):
        entry = _index_entry(item, base_url=base_url)
        if isinstance(entry, str):
            ignored.append(note(f"entry #{position}: {entry}"))
        else:
            entries.append(entry)
    if len(releases) > MAX_ENTRIES:
        ignored.append(f"entries after the first {MAX_ENTRIES} were not read")
    return entries, ignored, index_hash, incremental


def _index_entry(item: Any, *, base_url: str) -> FeedEntry | str:
    if not isinstance(item, dict):
        return "not an object"
    version = _version(item.get("version"))
    if version is None:
        return "no valid version"
    url = _http_url(item.get("url"), base_url)
    if url is None:
        return f"{version}: no valid http(s) url"
    sha256 = item.get("sha256")
    if not isinstance(sha256, str) or not HEX64.fullmatch(sha256):
        return f"{version}: sha256 is not 64 hex digits"
    size = _int(item.get("size"))
    if size is None:
        return f"{version}: size is not a whole number"
    manifest_sha256 = item.get("manifest_sha256")
    if manifest_sha256 is not None and (
        not isinstance(manifest_sha256, str) or not HEX64.fullmatch(manifest_sha256)
    ):
        return f"{version}: manifest_sha256 is not 64 hex digits"
    channel = item.get("channel")
    # A string first: a list or an object here is not hashable, and would raise.
    if channel is not None and (not isinstance(channel, str) or channel not in CHANNELS):
        return f"{version}: unknown channel"
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return FeedEntry(
        version=version,
        name=name if ASSET_NAME.fullmatch(name) else f"{version}.tar",
        url=url,
        size=size,
        sha256=sha256.lower(),
        manifest_sha256=manifest_sha256.lower() if manifest_sha256 else None,
        channel=channel,
        fingerprint=fingerprint("index", version, url, sha256.lower(), size),
    )


# ------------------------------------------------------------------ HTTP


class FeedClient:
    """Talks to feeds. `clock` dates Retry-After; nothing here sleeps."""

    def __init__(
        self,
        *,
        policy: EgressPolicy,
        allow_http: bool,
        timeout: float,
        clock: Callable[[], datetime],
        user_agent: str = "themis-update-manager",
    ) -> None:
        self.policy = policy
        self.allow_http = allow_http
        self.timeout = timeout
        self.clock = clock
        self.user_agent = user_agent

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # proxies from the environment would hide the destination
        adapter = GuardedAdapter(self.policy)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _get(
        self,
        session: requests.Session,
        url: str,
        *,
        source: FeedSource,
        headers: Mapping[str, str],
    ) -> requests.Response:
        """GET with redirects followed by hand; the token only to the feed's own origin."""
        home = _origin(source.url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_url(url, self.policy, allow_http=self.allow_http)
            except EgressRefused as refused:
                raise FeedError(
                    f"refused to fetch {note(url)}: {refused}", transient=False
                ) from None
            sent = {"User-Agent": self.user_agent, **headers}
            if source.token and _origin(url) == home:
                sent["Authorization"] = f"Bearer {source.token}"
            try:
                response = session.get(
                    url,
                    headers=sent,
                    stream=True,
                    allow_redirects=False,
                    timeout=(min(self.timeout, 10.0), self.timeout),
                )
            except EgressRefused as refused:
                raise FeedError(
                    f"refused to fetch {note(url)}: {refused}", transient=False
                ) from None
            except requests.RequestException as err:
                raise FeedError(
                    f"{_host(url)}: {note(type(err).__name__ + ': ' + str(err))}", transient=True
                ) from None
            location = response.headers.get("Location")
            if response.status_code not in REDIRECTS or not location:
                return response
            response.close()
            url = urljoin(url, location)
        raise FeedError(f"more than {MAX_REDIRECTS} redirects", transient=False)

    def _refuse_status(self, response: requests.Response, what: str) -> None:
        """Raise the FeedError an unwanted status means (rate limits included)."""
        status = response.status_code
        now = self.clock()
        rate = rate_limit(response.headers)
        retry_at = retry_after(response.headers.get("Retry-After"), now)
        detail = _server_message(response)
        host = _host(response.url or "")
        response.close()
        said = f": {detail}" if detail else ""
        if status == 429 or (status == 403 and (rate.remaining == 0 or retry_at is not None)):
            raise FeedError(
                f"rate limited by {host} (HTTP {status}) while fetching {what}{said}",
                transient=True,
                status=status,
                retry_at=retry_at,
                rate=rate,
                rate_limited=True,
            )
        raise FeedError(
            f"HTTP {status} from {host} for {what}{said}",
            transient=status >= 500 or status == 408,
            status=status,
            retry_at=retry_at,
            rate=rate,
        )

    def listing(self, source: FeedSource, *, deadline: float | None = None) -> Listing:
        """What the feed offers. `deadline` (time.monotonic()) cuts a server that is too slow.
        A GitHub list is read page by page (its `rel="next"` links, on the feed's own origin,
        at most MAX_PAGES); only the first request is conditional."""
        url = source.url
        headers = {"Accept": "application/json"}
        if source.kind == "github":
            url = with_per_page(url)
            headers = {
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            }
        elif source.index_hash:
            url = with_since(url, source.index_hash)
        conditional = dict(headers)
        if source.etag:
            conditional["If-None-Match"] = source.etag
        if source.last_modified:
            conditional["If-Modified-Since"] = source.last_modified
        with self._session() as session:
            first = self._page(
                session, url, source=source, headers=conditional, deadline=deadline, number=1
            )
            if first.not_modified:
                return Listing(status=304, rate=first.rate, not_modified=True)
            if source.kind == "github":
                return self._github_listing(session, source, first, headers, deadline)
        try:
            data = json.loads(first.body)
        except (ValueError, RecursionError):
            raise FeedError("the release list is not JSON", transient=False) from None
        entries, ignored, index_hash, incremental = parse_index(
            data,
            base_url=source.url,
            product=source.product,
            sent_hash=source.index_hash,
            body_sha256=hashlib.sha256(first.body).hexdigest(),
        )
        return Listing(
            status=200,
            rate=first.rate,
            entries=tuple(entries),
            ignored=tuple(ignored),
            etag=first.etag,
            last_modified=first.last_modified[:64],
            index_hash=index_hash,
            incremental=incremental,
        )

    def _github_listing(
        self,
        session: requests.Session,
        source: FeedSource,
        first: _Page,
        headers: Mapping[str, str],
        deadline: float | None,
    ) -> Listing:
        """Every page of a GitHub release list, or a FeedError: never a part of it. The
        first page's ETag and Last-Modified stand for the list, the latest rate limit is the
        one that counts."""
        releases = _release_page(first.body, 1)
        page, number, read, rate = first, 1, {first.url}, first.rate
        notes: list[str] = []
        while page.next_link is not None and len(releases) < MAX_ENTRIES:
            number += 1
            if number > MAX_PAGES:
                notes.append(f"releases after the first {MAX_PAGES} pages were not read")
                break
            url = _next_page(page.next_link, page.url, source=source, number=number)
            if url in read:
                raise FeedError(
                    f"the release list's link to page {number} points back to a page already"
                    f" read ({note(url)})",
                    transient=False,
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise FeedError(
                    f"the poll's time ran out before page {number} of the release list",
                    transient=True,
                    out_of_time=True,
                )
            page = self._page(
                session, url, source=source, headers=headers, deadline=deadline, number=number
            )
            read |= {url, page.url}
            rate = page.rate if page.rate.known else rate
            releases.extend(_release_page(page.body, number))
            del releases[MAX_ENTRIES + 1 :]  # one more than is read: there was more
        if not notes and (
            len(releases) > MAX_ENTRIES
            or (len(releases) == MAX_ENTRIES and page.next_link is not None)
        ):
            notes.append(f"releases after the first {MAX_ENTRIES} were not read")
        entries, ignored = parse_github(releases, product=source.product)
        return Listing(
            status=200,
            rate=rate,
            entries=tuple(entries),
            ignored=(*ignored, *notes),
            etag=first.etag,
            last_modified=first.last_modified[:64],
        )

    def _page(
        self,
        session: requests.Session,
        url: str,
        *,
        source: FeedSource,
        headers: Mapping[str, str],
        deadline: float | None,
        number: int,
    ) -> _Page:
        """One answer of a release list, read whole (capped); a 304 only to the first
        request (the conditional one)."""
        what = "the release list" if number == 1 else f"page {number} of the release list"
        response = self._get(session, url, source=source, headers=headers)
        with response, _Watchdog(response, deadline, what) as watchdog:
            rate = rate_limit(response.headers)
            if response.status_code == 304 and number == 1:  # later pages are never conditional
                return _Page(url=response.url or url, rate=rate, not_modified=True)
            if response.status_code != 200:
                self._refuse_status(response, what)
            try:
                body = _read_capped(response, LIST_MAX_BYTES, what)
            except FeedError:
                watchdog.check()  # cut for time: say so, not "broke"
                raise
            watchdog.check()
            link = response.links.get("next", {}).get("url")
            return _Page(
                url=response.url or url,
                rate=rate,
                body=body,
                etag=_header_value(response.headers.get("ETag")),
                last_modified=_header_value(response.headers.get("Last-Modified")),
                next_link=link if isinstance(link, str) else None,
            )

    def stream(
        self,
        source: FeedSource,
        entry: FeedEntry,
        *,
        deadline: float | None = None,
        chunk_size: int = 1 << 20,
    ) -> Generator[bytes, None, None]:
        """The bundle's bytes as they arrive. A broken or short download, or one still
        running at `deadline` (time.monotonic()), raises a transient FeedError; close the
        iterator to drop the connection early."""
        with self._session() as session:
            response = self._get(
                session,
                entry.url,
                source=source,
                headers={"Accept": "application/octet-stream", "Accept-Encoding": "identity"},
            )
            with response, _Watchdog(response, deadline, entry.name) as watchdog:
                if response.status_code != 200:
                    self._refuse_status(response, entry.name)
                got = 0
                try:
                    for chunk in response.iter_content(chunk_size):
                        got += len(chunk)
                        yield chunk
                except requests.RequestException as err:
                    watchdog.check()
                    raise FeedError(
                        f"the download of {entry.name} broke after {got} bytes: "
                        f"{note(type(err).__name__)}",
                        transient=True,
                    ) from None
                watchdog.check()
                if entry.size is not None and got < entry.size:
                    raise FeedError(
                        f"the download of {entry.name} ended after {got} of {entry.size} bytes",
                        transient=True,
                    )


@dataclass(frozen=True)
class _Page:
    """One answer of a release list: where it came from, its rate limit and body, and (for
    GitHub) its `rel="next"` link as sent."""

    url: str
    rate: RateLimit
    body: bytes = b""
    not_modified: bool = False
    etag: str = ""
    last_modified: str = ""
    next_link: str | None = None


def _next_page(link: str, page_url: str, *, source: FeedSource, number: int) -> str:
    """The URL of the next page, on the feed's own origin (its token goes there too), or a
    FeedError naming where the link points."""
    url = _http_url(link, page_url)
    if url is None:
        raise FeedError(
            f"the release list's link to page {number} is not an http(s) URL: {note(link)}",
            transient=False,
        )
    if _origin(url) != _origin(source.url):
        raise FeedError(
            f"refused to follow the release list's link to page {number} on another origin,"
            f" {_origin_name(url)} (the feed is on {_origin_name(source.url)})",
            transient=False,
        )
    return url


def _release_page(body: bytes, number: int) -> list[Any]:
    """A page of a GitHub release list: a JSON list, else a FeedError."""
    what = "the release list" if number == 1 else f"page {number} of the release list"
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise FeedError(f"{what} is not JSON", transient=False) from None
    if not isinstance(data, list):
        answer = "the answer" if number == 1 else what
        raise FeedError(f"{answer} is not a GitHub release list", transient=False)
    return data


class _Watchdog:
    """Cuts a response's connection when `deadline` (time.monotonic()) passes: a server
    dripping bytes cannot hold a worker past it (a read's own timeout only bounds silence)."""

    def __init__(self, response: requests.Response, deadline: float | None, what: str) -> None:
        self.fired = False
        self.what = what
        self._response = response
        self._timer: threading.Timer | None = None
        if deadline is not None:
            self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
            self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        connection = getattr(self._response.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def check(self) -> None:
        """Raise when the connection was cut for time: what was read is not to be trusted."""
        if self.fired:
            raise FeedError(
                f"the poll's time ran out while fetching {self.what}",
                transient=True,
                out_of_time=True,
            )


def _read_capped(response: requests.Response, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    try:
        for chunk in response.iter_content(1 << 16):
            got += len(chunk)
            if got > limit:
                raise FeedError(f"{what} is larger than {limit} bytes", transient=False)
            parts.append(chunk)
    except requests.RequestException as err:
        raise FeedError(
            f"reading {what} broke after {got} bytes: {note(type(err).__name__)}", transient=True
        ) from None
    return b"".join(parts)


def _server_message(response: requests.Response) -> str:
    """GitHub's {"message": ...} of an error answer, if short and JSON."""
    try:
        head = response.raw.read(4096, decode_content=True) if response.raw else b""
        data = json.loads(head)
    except Exception:  # an error body is a courtesy: anything odd is ignored
        return ""
    message = data.get("message") if isinstance(data, dict) else None
    return note(message) if isinstance(message, str) else ""


def _host(url: str) -> str:
    """The URL's host and port, never its user info."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the feed"
    host = parts.hostname or "the feed"
    return f"{host}:{port}" if port else host

"""Real HTTP servers on 127.0.0.1 for the release feed tests.

- `FakeGitHub` speaks the GitHub REST API's release list (`/repos/{owner}/{repo}/releases`,
  the real JSON shapes), paginated like GitHub's (`per_page`, default 30, at most
  `max_per_page`, 100 as on GitHub; `page`;
  a `Link` header with `rel="next"`, `"last"`, `"first"`, `"prev"` pointing to
  `/repositories/{id}/releases`), with its rate-limit headers (`X-RateLimit-*`, a 403 once
  none is left, a 304 that costs nothing), ETag and Last-Modified; `browser_download_url`
  redirects (302) to an object server on another port, as github.com redirects to
  objects.githubusercontent.com.
- `FakeIndex` serves a JSON index (docs/release-feeds.md) in full or, asked with `since=<hash>`,
  only the entries after that state; and the bundles it names.

Both can be scripted to answer a request with anything (429, 503, a broken body...), the
GitHub one also a given page of its list, and an asset can be cut mid-body (the connection
closed after N of its bytes).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from updates.releases.feed_client import fingerprint

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Clock:
    """The injected clock: starts now (whole seconds), moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class Sleeper:
    """The injected sleep: records, moves the clock, never sleeps."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)


@dataclass
class Blob:
    """A file a server hands out; `cut_after` bytes then a closed connection, `cuts` times."""

    data: bytes
    cut_after: int | None = None
    cuts: int = 0
    drip: float = 0.0  # seconds between single bytes: a server that never stalls, never ends


class _Server:
    """A ThreadingHTTPServer whose handler calls `self.handle(handler)`."""

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with outer.lock:
                    outer.seen.append(Seen("GET", self.path, dict(self.headers.items())))
                outer.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.script: deque[Answer] = deque()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self, prefix: str = "") -> list[str]:
        return [seen.path for seen in self.seen if seen.path.startswith(prefix)]

    @staticmethod
    def answer(
        handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if status != 304:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if status != 304 and body:
            handler.wfile.write(body)

    def blob(self, handler: BaseHTTPRequestHandler, blob: Blob) -> None:
        """The file, or its first `cut_after` bytes and a dead connection."""
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(blob.data)))
        handler.end_headers()
        with self.lock:
            cut = blob.cut_after is not None and blob.cuts > 0
            if cut:
                blob.cuts -= 1
        if blob.drip:
            for index in range(len(blob.data)):
                try:
                    handler.wfile.write(blob.data[index : index + 1])
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(blob.drip)
            return
        if not cut:
            handler.wfile.write(blob.data)
            return
        handler.wfile.write(blob.data[: blob.cut_after])
        handler.wfile.flush()
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)


class ObjectServer(_Server):
    """Where release assets really live (another origin than the API)."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, Blob] = {}
        self.downloads: Counter[str] = Counter()

    def put(self, key: str, blob: Blob) -> str:
        self.objects[key] = blob
        return f"{self.base}/objects/{key}"

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:
            self.answer(handler, *scripted)
            return
        key = urlsplit(handler.path).path.removeprefix("/objects/")
        blob = self.objects.get(key)
        if blob is None:
            self.answer(handler, 404, {}, b"Not Found")
            return
        with self.lock:
            self.downloads[key] += 1
        self.blob(handler, blob)


@dataclass
class GhAsset:
    name: str
    blob: Blob
    id: int
    updated_at: str = "2026-11-30T10:00:00Z"
    state: str = "uploaded"
    size: int | None = None  # None: the blob's size (a lie otherwise)


@dataclass
class GhRelease:
    tag: str
    assets: list[GhAsset] = field(default_factory=list)
    prerelease: bool = False
    draft: bool = False
    id: int = 0


class FakeGitHub(_Server):
    """The GitHub REST API's release list for one repository, rate limited like the real one."""

    owner = "themis"
    repo = "themisdb"
    repo_id = 1296269

    def __init__(self, objects: ObjectServer) -> None:
        super().__init__()
        self.objects = objects
        # Where the Link header's URLs point (None: here); answers scripted for one page.
        self.link_base: str | None = None
        self.page_script: dict[int, deque[Answer]] = {}
        self.page_delay: dict[int, float] = {}  # seconds before a page's answer
        self.max_per_page = 100
        self.releases: list[GhRelease] = []  # newest first, as GitHub lists them
        self.limit = 60
        self.remaining = 60
        self.reset = int(datetime.now(UTC).timestamp()) + 3600
        self.last_modified = email.utils.format_datetime(datetime(2026, 11, 30, tzinfo=UTC), True)
        self._next_id = 100

    @property
    def releases_url(self) -> str:
        return f"{self.base}/repos/{self.owner}/{self.repo}/releases"

    def add(
        self, tag: str, assets: dict[str, bytes], *, prerelease: bool = False, draft: bool = False
    ) -> GhRelease:
        """A release, newest: its assets uploaded to the object server."""
        release = GhRelease(tag=tag, prerelease=prerelease, draft=draft, id=self._id())
        for name, data in assets.items():
            release.assets.append(GhAsset(name=name, blob=Blob(data), id=self._id()))
        self.releases.insert(0, release)
        return release

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def asset(self, name: str) -> GhAsset:
        return next(a for r in self.releases for a in r.assets if a.name == name)

    def downloads(self, name: str) -> int:
        return self.objects.downloads[str(self.asset(name).id)]

    def pages(self) -> list[int]:
        """The page numbers of the release lists asked for, in order."""
        listed = [
            urlsplit(seen.path)
            for seen in self.seen
            if urlsplit(seen.path).path in self._list_paths()
        ]
        return [int(parse_qs(parts.query).get("page", ["1"])[0]) for parts in listed]

    def _list_paths(self) -> set[str]:
        return {
            f"/repos/{self.owner}/{self.repo}/releases",
            f"/repositories/{self.repo_id}/releases",
        }

    def _asset_json(self, release: GhRelease, asset: GhAsset) -> dict[str, Any]:
        api = f"{self.base}/repos/{self.owner}/{self.repo}"
        return {
            "url": f"{api}/releases/assets/{asset.id}",
            "id": asset.id,
            "node_id": f"RA_kwDO{asset.id}",
            "name": asset.name,
            "label": None,
            "uploader": {"login": "release-bot", "id": 1, "type": "Bot"},
            "content_type": "application/x-tar",
            "state": asset.state,
            "size": len(asset.blob.data) if asset.size is None else asset.size,
            "download_count": 0,
            "created_at": asset.updated_at,
            "updated_at": asset.updated_at,
            "browser_download_url": (
                f"{self.base}/{self.owner}/{self.repo}/releases/download/{release.tag}/{asset.name}"
            ),
        }

    def release_list(self, releases: list[GhRelease] | None = None) -> list[dict[str, Any]]:
        api = f"{self.base}/repos/{self.owner}/{self.repo}"
        return [
            {
                "url": f"{api}/releases/{r.id}",
                "assets_url": f"{api}/releases/{r.id}/assets",
                "upload_url": f"{api}/releases/{r.id}/assets{{?name,label}}",
                "html_url": f"https://github.com/{self.owner}/{self.repo}/releases/tag/{r.tag}",
                "id": r.id,
                "author": {"login": "release-bot", "id": 1, "type": "Bot"},
                "node_id": f"RE_kwDO{r.id}",
                "tag_name": r.tag,
                "target_commitish": "main",
                "name": r.tag.lstrip("v"),
                "draft": r.draft,
                "prerelease": r.prerelease,
                "created_at": "2026-11-30T10:00:00Z",
                "published_at": "2026-11-30T10:00:00Z",
                "assets": [self._asset_json(r, a) for a in r.assets],
                "tarball_url": f"{api}/tarball/{r.tag}",
                "zipball_url": f"{api}/zipball/{r.tag}",
                "body": "Release notes",
            }
            for r in (self.releases if releases is None else releases)
        ]

    def rate_headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
            "X-RateLimit-Used": str(self.limit - self.remaining),
            "X-RateLimit-Resource": "core",
        }

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        if path in self._list_paths():
            self._list(handler)
            return
        prefix = f"/{self.owner}/{self.repo}/releases/download/"
        if path.startswith(prefix):
            tag, _, name = path.removeprefix(prefix).partition("/")
            for release in self.releases:
                for asset in release.assets:
                    if release.tag == tag and asset.name == name:
                        location = self.objects.put(str(asset.id), asset.blob)
                        self.answer(handler, 302, {"Location": location}, b"")
                        return
        self.answer(handler, 404, {"Content-Type": "application/json"}, b'{"message": "Not Found"}')

    def page_body(self, page: int, per_page: int) -> bytes:
        shown = self.releases[(page - 1) * per_page : page * per_page]
        return json.dumps(self.release_list(shown)).encode()

    @staticmethod
    def etag(body: bytes) -> str:
        return f'W/"{hashlib.sha256(body).hexdigest()[:40]}"'

    @staticmethod
    def _number(query: dict[str, list[str]], name: str, default: int) -> int:
        value = query.get(name, [""])[0]
        return int(value) if value.isdigit() and int(value) > 0 else default

    def _page_links(self, page: int, per_page: int, last: int) -> str:
        base = self.link_base or self.base
        url = f"{base}/repositories/{self.repo_id}/releases?per_page={per_page}&page="
        links = []
        if page < last:
            links += [f'<{url}{page + 1}>; rel="next"', f'<{url}{last}>; rel="last"']
        if page > 1:
            links += [f'<{url}1>; rel="first"', f'<{url}{page - 1}>; rel="prev"']
        return ", ".join(links)

    def _list(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        per_page = min(self._number(query, "per_page", 30), self.max_per_page)
        page = self._number(query, "page", 1)
        with self.lock:
            scripted = self.script.popleft() if self.script else None
            for_page = self.page_script.get(page)
            if scripted is None and for_page:
                scripted = for_page.popleft()
        if scripted is not None:
            self.answer(handler, *scripted)
            return
        time.sleep(self.page_delay.get(page, 0.0))
        last = max(1, -(-len(self.releases) // per_page))
        body = self.page_body(page, per_page)
        links = self._page_links(page, per_page, last)
        etag = self.etag(body)
        with self.lock:
            if self.remaining <= 0:
                message = {
                    "message": "API rate limit exceeded for 127.0.0.1.",
                    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                }
                headers = {**self.rate_headers(), "Content-Type": "application/json"}
                self.answer(handler, 403, headers, json.dumps(message).encode())
                return
            if handler.headers.get("If-None-Match") == etag:
                # A conditional request answered 304 does not count against the rate limit.
                self.answer(handler, 304, {**self.rate_headers(), "ETag": etag}, b"")
                return
            self.remaining -= 1
            headers = {
                **self.rate_headers(),
                "Content-Type": "application/json; charset=utf-8",
                "ETag": etag,
                "Last-Modified": self.last_modified,
                **({"Link": links} if links else {}),
            }
        self.answer(handler, 200, headers, body)


@dataclass
class IndexState:
    hash: str
    entries: list[dict[str, Any]]


class FakeIndex(_Server):
    """A JSON release index with manifest sync: `?since=<hash>` gets only what came after."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[IndexState] = [IndexState("h0", [])]
        self.bundles: dict[str, Blob] = {}
        self.downloads: Counter[str] = Counter()
        self.incremental = True  # answer `since` incrementally when the state is known

    @property
    def url(self) -> str:
        return f"{self.base}/index.json"

    def publish(self, *entries: dict[str, Any]) -> str:
        """A new state of the index with these entries added; returns its hash."""
        current = self.states[-1].entries
        new_hash = (
            "h"
            + fingerprint(*(json.dumps(e, sort_keys=True) for e in current + list(entries)))[:16]
        )
        self.states.append(IndexState(new_hash, current + list(entries)))
        return new_hash

    def entry(
        self, name: str, data: bytes, manifest: bytes | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """An entry for a bundle served here as themisdb-`name`.tar (a relative URL, as the
        format allows); `name` is its version unless `overrides` says otherwise."""
        version = name
        name = f"themisdb-{name}.tar"
        self.bundles[name] = Blob(data)
        entry: dict[str, Any] = {
            "version": version,
            "url": f"bundles/{name}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        if manifest is not None:
            entry["manifest_sha256"] = hashlib.sha256(manifest).hexdigest()
        entry.update(overrides)
        return entry

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        if parts.path.startswith("/bundles/"):
            name = parts.path.removeprefix("/bundles/")
            blob = self.bundles.get(name)
            if blob is None:
                self.answer(handler, 404, {}, b"no such bundle")
                return
            with self.lock:
                self.downloads[name] += 1
            self.blob(handler, blob)
            return
        with self.lock:
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:
            self.answer(handler, *scripted)
            return
        if parts.path != "/index.json":
            self.answer(handler, 404, {}, b"")
            return
        state = self.states[-1]
        etag = f'"{state.hash}"'
        if handler.headers.get("If-None-Match") == etag:
            self.answer(handler, 304, {"ETag": etag}, b"")
            return
        since = parse_qs(parts.query).get("since", [""])[0]
        known = {s.hash: s for s in self.states}
        document: dict[str, Any] = {"format": 1, "product": "themisdb", "hash": state.hash}
        if self.incremental and since in known:
            done = len(known[since].entries)
            document.update(since=since, releases=state.entries[done:])
        else:
            document.update(since=None, releases=state.entries)
        headers = {"Content-Type": "application/json", "ETag": etag}
        self.answer(handler, 200, headers, json.dumps(document).encode())


@pytest.fixture
def object_server() -> Iterator[ObjectServer]:
    server = ObjectServer()
    yield server
    server.close()


@pytest.fixture
def github(object_server: ObjectServer) -> Iterator[FakeGitHub]:
    server = FakeGitHub(object_server)
    yield server
    server.close()


@pytest.fixture
def index_server() -> Iterator[FakeIndex]:
    server = FakeIndex()
    yield server
    server.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeper(clock: Clock) -> Sleeper:
    return Sleeper(clock)

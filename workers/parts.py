"""Delivery by parts, node side: fetch only the files this node lacks, verify each on arrival.

The dashboard serves a release as its signed manifest, the detached signature and one object
per file, named by its SHA-256 (`<parts_url>manifest.json`, `...manifest.json.p7s`,
`...<sha256>`), behind the job's download token. Here, in this order:

1. the manifest and its signature are fetched (small, size-capped) and verified by the engine
   against this node's trust anchor, with the product, version rule, expiry and every path,
   before a single payload byte is asked for (`open_parts_staging`);
2. files the node already holds (same path and bytes, or the same bytes at another path, by
   the engine's hash cache) are copied into the staging, hashed as they are copied;
3. the rest is fetched in parallel by the downloader (executables first), each file hashed as
   its bytes arrive and staged the moment it completes; the first bad file stops every other
   transfer, and the staging is removed: nothing is left behind;
4. the complete staging goes to the engine's apply with a head-only bundle, and the apply
   checks the signature and re-hashes every staged file before anything reaches the target.

Plain Python, no Django.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from updates.engine.extract import BundleLimits
from updates.engine.manifest import ManifestFile
from updates.engine.parts import StagedRelease, open_parts_staging
from workers.fetch import (
    DownloadStats,
    DownloadTask,
    ParallelDownloader,
    Progress,
    fetch_small,
    priority_for,
)

log = logging.getLogger("themis.agent.parts")

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.p7s"


@dataclass(frozen=True)
class PartsResult:
    """A release staged from its parts, and what it took."""

    staged: StagedRelease
    files_total: int
    bytes_total: int
    files_fetched: int
    bytes_fetched: int  # received over the network (payload; retries included)
    files_local: int  # copied from files this node already had
    bytes_local: int
    stats: DownloadStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "parts",
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "files_fetched": self.files_fetched,
            "bytes_fetched": self.bytes_fetched,
            "files_local": self.files_local,
            "bytes_local": self.bytes_local,
            "requests": self.stats.requests,
            "retries": self.stats.retries,
        }


def object_url(parts_url: str, name: str) -> str:
    return parts_url.rstrip("/") + "/" + name


def fetch_by_parts(
    parts_url: str,
    *,
    token: str,
    state_dir: Path,
    target: Path,
    trust_anchor: Path,
    product: str = "themisdb",
    allow_downgrade: bool = False,
    concurrency: int = 4,
    limit_bps: float | None = None,
    progress: Callable[[Progress], None] | None = None,
    session_factory: Callable[[], requests.Session] = requests.Session,
    sleep: Callable[[float], None] | None = None,
    rng: random.Random | None = None,
    downloader_options: Mapping[str, Any] | None = None,
) -> PartsResult:
    """Stage the release behind `parts_url` from its parts; raises the first failure (an
    EngineError naming the file and the cause) with nothing staged left behind."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = BundleLimits()
    small: dict[str, Any] = {"headers": headers}
    if sleep is not None:
        small["sleep"] = sleep
    session = session_factory()
    try:
        manifest_bytes = fetch_small(
            object_url(parts_url, MANIFEST),
            limit=limits.max_manifest_size,
            session=session,
            rng=rng,
            **small,
        )
        signature = fetch_small(
            object_url(parts_url, SIGNATURE),
            limit=limits.max_signature_size,
            session=session,
            rng=rng,
            **small,
        )
    finally:
        session.close()
    # Nothing of the payload is asked for before this has passed.
    staging = open_parts_staging(
        manifest_bytes,
        signature,
        trust_anchor=trust_anchor,
        state_dir=state_dir,
        target=target,
        product=product,
        allow_downgrade=allow_downgrade,
    )
    try:
        plan = staging.plan(target)
        fetch = list(plan.fetch)
        copies = dict(plan.copies)
        fetched_sha = {entry.sha256: entry for entry in fetch}
        files_local = bytes_local = 0
        for entry, source in plan.local:
            if staging.stage_local(entry, source):
                files_local += 1
                bytes_local += entry.size
            elif entry.sha256 in fetched_sha:
                copies[entry.path] = fetched_sha[entry.sha256]
            else:  # the installed file is not what the cache said: fetch it
                fetched_sha[entry.sha256] = entry
                fetch.append(entry)
        tasks = [_task(parts_url, entry, staging.open_file) for entry in fetch]
        options: dict[str, Any] = dict(downloader_options or {})
        if sleep is not None:
            options.setdefault("sleep", sleep)
        if rng is not None:
            options.setdefault("rng", rng)
        downloader = ParallelDownloader(
            concurrency=concurrency,
            limit_bps=limit_bps,
            headers=headers,
            session_factory=session_factory,
            progress=progress,
            **options,
        )
        stats = downloader.run(tasks)
        entries = staging.entries
        for path, staged_from in copies.items():
            staging.stage_copy(entries[path], staged_from)
        staged = staging.finish()
    except BaseException:
        staging.discard()
        raise
    manifest = staging.manifest
    result = PartsResult(
        staged=staged,
        files_total=len(manifest.files),
        bytes_total=manifest.total_size,
        files_fetched=len(fetch),
        bytes_fetched=stats.bytes_fetched,
        files_local=files_local,
        bytes_local=bytes_local,
        stats=stats,
    )
    log.info(
        "release %s staged by parts: %d of %d files fetched (%d bytes), %d reused",
        manifest.version,
        result.files_fetched,
        result.files_total,
        result.bytes_fetched,
        result.files_local + len(copies),
    )
    return result


def _task(
    parts_url: str, entry: ManifestFile, open_file: Callable[[ManifestFile], Any]
) -> DownloadTask:
    return DownloadTask(
        url=object_url(parts_url, entry.sha256),
        size=entry.size,
        sha256=entry.sha256,
        open_sink=functools.partial(open_file, entry),
        priority=priority_for(entry.path, entry.mode),
        name=entry.path,
    )

"""Releases with real files in the (per-test) MEDIA_ROOT, and jobs for them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.http import HttpResponseBase, StreamingHttpResponse

from updates.models import Node, Release, ReleaseFile, UpdateJob


def payload(size: int, seed: int = 7) -> bytes:
    """Deterministic bytes that differ at every offset (a shifted resume shows)."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def stored_files() -> list[str]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def queued_parts_marker(release: Release) -> str:
    """The file that says a release's parts extraction is queued (updates/releases/parts.py)."""
    return f"parts/releases/{release.sha256}.pending"


def streamed_body(response: HttpResponseBase) -> bytes:
    """All of a streaming response's body. The test client's stubs type every
    response as a plain one, so the streaming type is checked here."""
    assert isinstance(response, StreamingHttpResponse)
    return response.getvalue()  # b"".join(response.streaming_content)


class MakeRelease(Protocol):
    """The type of the `make_release` fixture."""

    def __call__(
        self, version: str = "1.7.0", content: bytes | None = None, deltas: int = 0
    ) -> Release: ...


class MakeJob(Protocol):
    """The type of the `make_job` fixture."""

    def __call__(
        self, release: Release | None, node: Node, state: str = UpdateJob.State.QUEUED
    ) -> UpdateJob: ...


@pytest.fixture
def make_release(db: None) -> MakeRelease:
    def make(version: str = "1.7.0", content: bytes | None = None, deltas: int = 0) -> Release:
        content = payload(300_000) if content is None else content
        release = Release(
            version=version, size=len(content), sha256=hashlib.sha256(content).hexdigest()
        )
        release.artifact.save(f"themisdb-{version}.tar", ContentFile(content), save=False)
        release.save()
        for base in range(deltas):
            delta = ReleaseFile(release=release, base_version=f"1.{base}.0", size=10)
            delta.file.save(f"delta-{base}-{version}.bin", ContentFile(b"d" * 10), save=False)
            delta.save()
        return release

    return make


@pytest.fixture
def make_job(db: None) -> MakeJob:
    def make(release: Release | None, node: Node, state: str = UpdateJob.State.QUEUED) -> UpdateJob:
        return UpdateJob.objects.create(node=node, release=release, state=state)

    return make


# The release feed tests' real HTTP servers, clock and sleep.
from tests.releases.feed_servers import (  # noqa: E402,F401 - fixtures
    clock,
    github,
    index_server,
    object_server,
    sleeper,
)

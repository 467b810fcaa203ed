"""The agent's apply with delivery by parts, in-process against a real engine and a real
HTTP server on 127.0.0.1 serving both the release's parts and its full bundle: the parts are
used when they work, the full bundle when they do not. Only the broker is replaced
(`app.send_task` is recorded)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent.file_server import FileServer
from tests.agent.parts_fixtures import CHANGED, PREFIX, Node, Releases, served_parts, sha, tree
from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine.commands import CommandType
from workers import agent
from workers.fetch import ParallelDownloader
from workers.parts import fetch_by_parts

KEY = bytes(range(32))
BUNDLE = "bundles/themisdb-1.1.0.tar"


@pytest.fixture
def server(releases: Releases) -> Iterator[FileServer]:
    files: dict[str, bytes] = {
        **served_parts(releases.n1, releases.files_n1),
        BUNDLE: releases.n1.read_bytes(),
    }
    srv = FileServer(files, token="job-token")
    yield srv
    srv.close()


@pytest.fixture
def sent(
    node: Node, releases: Releases, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, dict[str, Any]]]:
    node.install(releases.n)
    env = {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(node.target),
        "THEMIS_STATE_DIR": str(node.state),
        "THEMIS_TRUST_ANCHOR": str(node.pki.root),
        "THEMIS_HEARTBEAT_SECONDS": "60",
        "THEMIS_NODE_KEY": KEY.hex(),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("THEMIS_AGENT_FAULTS", raising=False)
    agent.install_faults(None)
    reports: list[tuple[str, dict[str, Any]]] = []

    def record(name: str, kwargs: dict[str, Any], queue: str) -> None:
        reports.append((name, dict(kwargs["envelope"]["payload"])))

    monkeypatch.setattr(app, "send_task", record)
    return reports


def apply(server: FileServer, releases: Releases, job_id: str) -> None:
    bundle = releases.n1.read_bytes()
    args = {
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "size": len(bundle),
        "artifact_url": server.url(BUNDLE),
        "parts_url": server.url(PREFIX) + "/",
        "download_token": "job-token",
        "version": "1.1.0",
    }
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id=job_id))


def final(sent: list[tuple[str, dict[str, Any]]], job_id: str) -> dict[str, Any]:
    (report,) = [r for name, r in sent if name == agent.FINISHED_TASK and r["job_id"] == job_id]
    return report


def test_the_agent_applies_by_parts_fetching_only_what_changed(
    node: Node, releases: Releases, server: FileServer, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    apply(server, releases, "41")
    report = final(sent, "41")
    assert report["ok"], report
    delivery = report["result"]["delivery"]
    assert delivery["files_fetched"] == len(CHANGED)
    assert delivery["files_local"] == len(releases.files_n1) - len(CHANGED)
    assert tree(node.target) == releases.files_n1
    requested = server.paths_requested()
    assert BUNDLE not in requested
    assert sorted(requested[2:]) == sorted(f"{PREFIX}/{sha(releases.files_n1[p])}" for p in CHANGED)
    assert all(s.authorization == "Bearer job-token" for s in server.log)
    downloading = [r for name, r in sent if r.get("step") == "DOWNLOADING"]
    last = downloading[-1]
    assert last["bytes_done"] == last["bytes_total"] == delivery["bytes_fetched"]
    assert last["eta_seconds"] == 0 and last["bytes_per_second"] >= 0
    assert node.leftovers() == []


def test_a_bad_part_falls_back_to_the_full_bundle(
    node: Node, releases: Releases, server: FileServer, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    server.faults.wrong.add(f"{PREFIX}/{sha(releases.files_n1['lib/mod2.so'])}")
    apply(server, releases, "42")
    report = final(sent, "42")
    assert report["ok"], report
    assert "delivery" not in report["result"]
    assert server.requests_for(BUNDLE)[-1].status == 200
    assert tree(node.target) == releases.files_n1
    assert node.leftovers() == []


def test_parts_the_dashboard_refuses_fall_back_to_the_full_bundle(
    node: Node, releases: Releases, server: FileServer, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    server.faults.statuses[f"/{PREFIX}/manifest.json"] = [404]
    apply(server, releases, "43")
    assert final(sent, "43")["ok"]
    assert [p for p in server.paths_requested() if p != BUNDLE] == [f"{PREFIX}/manifest.json"]
    assert tree(node.target) == releases.files_n1
    assert node.leftovers() == []


def test_the_nodes_download_settings_reach_both_ways_of_fetching(
    node: Node,
    releases: Releases,
    server: FileServer,
    sent: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """THEMIS_DOWNLOAD_CONCURRENCY and THEMIS_DOWNLOAD_LIMIT_BPS bound the parts fetch and
    the full bundle's alike (each recorded on its way to the real downloader)."""
    monkeypatch.setenv("THEMIS_DOWNLOAD_CONCURRENCY", "3")
    monkeypatch.setenv("THEMIS_DOWNLOAD_LIMIT_BPS", "1000000000")
    by_parts: list[dict[str, Any]] = []
    downloaders: list[dict[str, Any]] = []
    real_fetch, real_downloader = fetch_by_parts, ParallelDownloader

    def fetch(url: str, **kwargs: Any) -> Any:
        by_parts.append(kwargs)
        return real_fetch(url, **kwargs)

    def downloader(**kwargs: Any) -> Any:
        downloaders.append(kwargs)
        return real_downloader(**kwargs)

    monkeypatch.setattr(agent, "fetch_by_parts", fetch)
    monkeypatch.setattr(agent, "ParallelDownloader", downloader)
    server.faults.statuses[f"/{PREFIX}/manifest.json"] = [404]  # parts refused: the full bundle
    apply(server, releases, "44")
    assert final(sent, "44")["ok"]
    ((parts,), (full,)) = by_parts, downloaders
    assert (parts["concurrency"], parts["limit_bps"]) == (3, 1e9)
    assert (parts["product"], parts["allow_downgrade"]) == ("themisdb", False)
    assert (full["concurrency"], full["limit_bps"]) == (3, 1e9)
    assert full["split_bytes"] == agent.SPLIT_BYTES
    assert full["headers"] == {"Authorization": "Bearer job-token"}

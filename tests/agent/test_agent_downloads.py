"""The agent's download settings and its bundle fetch without a known size."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest

from tests.agent.file_server import FileServer
from tests.releases.conftest import payload
from themis_dashboard.celery import app
from workers import agent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(tmp_path / "install"),
        "THEMIS_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def test_download_settings_from_the_environment(tmp_path: Path) -> None:
    default = agent.AgentConfig.from_env(_env(tmp_path))
    assert (default.download_concurrency, default.download_limit_bps) == (4, None)
    tuned = agent.AgentConfig.from_env(
        _env(tmp_path, THEMIS_DOWNLOAD_CONCURRENCY="8", THEMIS_DOWNLOAD_LIMIT_BPS="2.5e6")
    )
    assert (tuned.download_concurrency, tuned.download_limit_bps) == (8, 2.5e6)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("THEMIS_DOWNLOAD_CONCURRENCY", "0", "at least 1"),
        ("THEMIS_DOWNLOAD_CONCURRENCY", "many", "at least 1"),
        ("THEMIS_DOWNLOAD_LIMIT_BPS", "fast", "expected bytes per second"),
        ("THEMIS_DOWNLOAD_LIMIT_BPS", "-5", "positive"),
        ("THEMIS_DOWNLOAD_LIMIT_BPS", "inf", "positive"),
    ],
)
def test_bad_download_settings_name_the_variable(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match=f"{name}: .*{message}"):
        agent.AgentConfig.from_env(_env(tmp_path, **{name: value}))


def test_a_bundle_of_unknown_size_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "send_task", lambda *_a, **_k: None)
    content = payload(200_000)
    server = FileServer({"b.tar": content}, token="t")
    try:
        config = agent.AgentConfig.from_env(_env(tmp_path))
        reporter = agent.JobReporter("5", "n1")
        dest = tmp_path / "downloads" / "b.bundle"
        sha = hashlib.sha256(content).hexdigest()
        agent.fetch_bundle(config, reporter, server.url("b.tar"), "t", dest, sha, None)
    finally:
        server.close()
    assert dest.read_bytes() == content


def test_rate_and_eta_go_along_only_when_they_are_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(
        app, "send_task", lambda name, kwargs, queue: sent.append(kwargs["envelope"]["payload"])
    )
    report = agent.JobReporter("9", "n1", bytes(range(32))).download_progress()
    report(10, 10, rate=math.nan, eta=-1.0)
    report(10, 10, rate=1234.5, eta=1e12)
    assert "bytes_per_second" not in sent[0] and "eta_seconds" not in sent[0]
    assert sent[1]["bytes_per_second"] == 1234
    assert sent[1]["eta_seconds"] == agent.MAX_ETA_SECONDS

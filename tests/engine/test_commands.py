"""Signed commands: what the agent's check refuses, and the nonce store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from updates.engine.commands import (
    CommandRefused,
    CommandType,
    NonceStore,
    sign_command,
    verify_command,
)

KEY = b"k" * 32
ARGS = {"sha256": "ab" * 32, "artifact_url": "https://x/a", "version": "1.1"}


def _envelope(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "node_id": "n1",
        "job_id": "5",
        "command": CommandType.APPLY,
        "args": ARGS,
        "expires": 2000,
    }
    fields.update(over)
    return sign_command(KEY, **fields)


def test_round_trip() -> None:
    command = verify_command(KEY, _envelope(), node_id="n1", command=CommandType.APPLY, now=1000)
    assert (command.job_id, command.args, command.expires) == ("5", ARGS, 2000)


@pytest.mark.parametrize(
    ("envelope", "node", "kind", "message"),
    [
        (None, "n1", CommandType.APPLY, "unsigned"),
        (_envelope(node_id="n2"), "n1", CommandType.APPLY, "signed for node"),
        (_envelope(), "n1", CommandType.ROLLBACK, "sent as rollback"),
        (_envelope(expires=999), "n1", CommandType.APPLY, "expired"),
        (_envelope(expires=10**9), "n1", CommandType.APPLY, "too far"),
        (_envelope(args={**ARGS, "bundle_path": "/tmp/x"}), "n1", CommandType.APPLY, "bundle_path"),
        (_envelope(job_id=None), "n1", CommandType.APPLY, "without a job id"),
        (
            _envelope(job_id=None, command=CommandType.CANCEL, args={}),
            "n1",
            CommandType.CANCEL,
            "without a job id",
        ),
        (
            _envelope(command=CommandType.HEARTBEAT, args={}),
            "n1",
            CommandType.HEARTBEAT,
            "names no job",
        ),
        (
            _envelope(job_id=None, command=CommandType.HEARTBEAT, args={"role": "active"}),
            "n1",
            CommandType.HEARTBEAT,
            "does not send",
        ),
    ],
)
def test_refused(envelope: Any, node: str, kind: CommandType, message: str) -> None:
    with pytest.raises(CommandRefused, match=message):
        verify_command(KEY, envelope, node_id=node, command=kind, now=1000)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e["args"].update(allow_downgrade=True),
        lambda e: e.update(node_id="n2"),
        lambda e: e.update(expires=e["expires"] + 1),
        lambda e: e.update(nonce="0" * 32),
        lambda e: e.update(sig="0" * 64),
        lambda e: e.update(sig="\x80" * 64),
    ],
)
def test_tampering_breaks_the_signature(mutate: Callable[[dict[str, Any]], object]) -> None:
    envelope = _envelope()
    mutate(envelope)
    with pytest.raises(CommandRefused, match="signature|signed for"):
        verify_command(KEY, envelope, node_id="n1", command=CommandType.APPLY, now=1000)


def test_an_extra_envelope_field_is_refused() -> None:
    envelope = {**_envelope(), "bundle_path": "/tmp/x"}
    with pytest.raises(CommandRefused, match="unknown fields"):
        verify_command(KEY, envelope, node_id="n1", command=CommandType.APPLY, now=1000)


def test_nonce_store_refuses_a_replay_until_expiry(tmp_path: Path) -> None:
    store = NonceStore(tmp_path)
    assert store.remember("a" * 32, 2000, now=1000)
    assert not NonceStore(tmp_path).remember("a" * 32, 2000, now=1500)  # a restarted agent too
    assert store.remember("b" * 32, 3000, now=2500)  # "a" expired: pruned
    assert not store.seen("a" * 32) and store.seen("b" * 32)

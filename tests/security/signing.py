"""Reports and commands signed as the real agent and relay sign them, for tests."""

from __future__ import annotations

import time
from typing import Any

from updates.engine.commands import CommandType, sign_command
from updates.engine.reports import ReportType, sign_report
from updates.fleet.node_keys import node_key


def key_of(node_id: str) -> bytes:
    key = node_key(node_id)
    assert key is not None, f"node {node_id} has no key in force"
    return key


def signed_report(
    node_id: str,
    report_type: ReportType,
    payload: dict[str, Any],
    *,
    key: bytes | None = None,
    seq: int | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """An envelope as node `node_id`'s agent would send it (its stored key by default)."""
    return sign_report(
        key if key is not None else key_of(node_id),
        report_type,
        {"node_id": node_id, **payload},
        seq=seq,
        now=now,
    )


def signed_command(
    key: bytes,
    node_id: str,
    command: CommandType,
    args: dict[str, Any],
    *,
    job_id: str | None = None,
    lifetime: float = 120,
    nonce: str | None = None,
) -> dict[str, Any]:
    return sign_command(
        key,
        node_id=node_id,
        job_id=job_id,
        command=command,
        args=args,
        expires=time.time() + lifetime,
        nonce=nonce,
    )

"""Signed commands from the dashboard to one node's agent.

Every agent reads its own queue on a broker other clients can write to, so a
command proves nothing by arriving. The dashboard signs each one with the
node's own key (HMAC-SHA256) over the node, the job, the command type, every
argument (canonical JSON), an expiry and a random nonce; the agent checks all
of it before it does anything, and remembers nonces until they expire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .reports import canonical_json, is_hex_digest
from .state import write_json_atomic


class CommandType(StrEnum):
    APPLY = "apply"
    ROLLBACK = "rollback"
    TRAFFIC_ROLE = "traffic_role"
    CANCEL = "cancel"
    HEARTBEAT = "heartbeat"  # send a heartbeat now (health on demand)
    # Expand/contract: the installed release's contract migrations (and the column drops
    # whose grace ended), once every node of the cluster runs that release.
    CONTRACT = "contract"
    # A newer signed trust store (updates.engine.truststore) for the node to take.
    TRUST_STORE = "trust_store"


# The Celery task that carries each command type.
TASK_FOR = {
    CommandType.APPLY: "agent.apply",
    CommandType.ROLLBACK: "agent.rollback",
    CommandType.TRAFFIC_ROLE: "agent.set_traffic_role",
    CommandType.CANCEL: "agent.cancel",
    CommandType.HEARTBEAT: "agent.heartbeat_now",
    CommandType.CONTRACT: "agent.contract",
    CommandType.TRUST_STORE: "agent.install_trust_store",
}

# The arguments the dashboard sends with each command type, and nothing else:
# `allow_downgrade` only when an operator asked for it (it is then signed);
# a local `bundle_path` never.
ALLOWED_ARGS: dict[CommandType, frozenset[str]] = {
    CommandType.APPLY: frozenset(
        {
            "artifact_url",
            "download_token",
            "sha256",
            "size",
            "version",
            "health_timeout",
            "full_artifact_url",
            "full_sha256",
            "full_size",
            # Delivery by parts (the release's manifest and per-file objects); the agent
            # falls back to `artifact_url` when it fails.
            "parts_url",
            "allow_downgrade",
            # A multi-component update: the bundles to install, in order, all or none
            # (the keys above still name the target, for an agent that has no plans).
            "plan",
        }
    ),
    CommandType.ROLLBACK: frozenset({"point_id"}),
    CommandType.TRAFFIC_ROLE: frozenset({"role"}),
    CommandType.CANCEL: frozenset(),
    CommandType.HEARTBEAT: frozenset(),
    # The release whose contract this is: the agent refuses to contract another one.
    CommandType.CONTRACT: frozenset({"version"}),
    # The store as distributed (it carries its own signature) and its version.
    CommandType.TRUST_STORE: frozenset({"store_version", "store"}),
}

# The commands about one job, which must name it; the others must not.
JOB_COMMANDS = frozenset(
    {CommandType.APPLY, CommandType.ROLLBACK, CommandType.CANCEL, CommandType.CONTRACT}
)

NONCE_BYTES = 16
# Refuse expiries further out than this: a leaked envelope must not live for days.
MAX_LIFETIME_SECONDS = 24 * 3600


class CommandRefused(Exception):
    """The envelope is not a valid command for this node and task."""


@dataclass(frozen=True)
class SignedCommand:
    node_id: str
    job_id: str | None
    command: CommandType
    args: dict[str, Any]
    expires: int
    nonce: str


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    return hmac.new(key, canonical_json(fields).encode(), hashlib.sha256).hexdigest()


def sign_command(
    key: bytes,
    *,
    node_id: str,
    job_id: str | None,
    command: CommandType,
    args: dict[str, Any],
    expires: float,
    nonce: str | None = None,
) -> dict[str, Any]:
    """The envelope a command travels in (the task's only argument)."""
    fields: dict[str, Any] = {
        "node_id": node_id,
        "job_id": job_id,
        "command": str(CommandType(command)),
        # JSON round trip: the signature covers exactly what the agent will see.
        "args": json.loads(json.dumps(args)),
        "expires": int(expires),
        "nonce": nonce or secrets.token_hex(NONCE_BYTES),
    }
    return {**fields, "sig": _mac(key, fields)}


def verify_command(
    key: bytes,
    envelope: Any,
    *,
    node_id: str,
    command: CommandType,
    now: float | None = None,
) -> SignedCommand:
    """The command in a valid envelope for this node and command type; CommandRefused
    otherwise. The caller still has to check the nonce is new (NonceStore)."""
    if not isinstance(envelope, dict):
        raise CommandRefused("unsigned command (no envelope)")
    extra = set(envelope) - {"node_id", "job_id", "command", "args", "expires", "nonce", "sig"}
    if extra:
        raise CommandRefused(f"envelope carries unknown fields {sorted(extra)}")
    fields = {k: envelope.get(k) for k in ("node_id", "job_id", "command", "args", "expires")}
    fields["nonce"] = envelope.get("nonce")
    sig = envelope.get("sig")
    job_id, args, expires, nonce = (
        fields["job_id"],
        fields["args"],
        fields["expires"],
        fields["nonce"],
    )
    if (
        not isinstance(sig, str)
        or not isinstance(fields["node_id"], str)
        or not isinstance(fields["command"], str)
        or not (job_id is None or isinstance(job_id, str))
        or not isinstance(args, dict)
        or not isinstance(expires, int)
        or isinstance(expires, bool)
        or not isinstance(nonce, str)
        or len(nonce) != 2 * NONCE_BYTES
    ):
        raise CommandRefused("envelope fields missing or of the wrong type")
    try:
        expected = _mac(key, fields)
    except (TypeError, ValueError, RecursionError):
        raise CommandRefused("arguments are not plain JSON") from None
    if not is_hex_digest(sig) or not hmac.compare_digest(expected, sig):
        raise CommandRefused("signature does not match this node's key")
    if fields["node_id"] != node_id:
        raise CommandRefused(f"signed for node {fields['node_id']!r}, not this one")
    if fields["command"] != command:
        raise CommandRefused(f"a {fields['command']} command sent as {command}")
    current = now if now is not None else time.time()
    if expires < current:
        raise CommandRefused(f"expired {int(current - expires)} s ago")
    if expires > current + MAX_LIFETIME_SECONDS:
        raise CommandRefused("expiry too far in the future")
    unknown = set(args) - ALLOWED_ARGS[command]
    if unknown:
        raise CommandRefused(f"arguments the dashboard does not send: {sorted(unknown)}")
    if command in JOB_COMMANDS and job_id is None:
        raise CommandRefused("a job command without a job id")
    if command not in JOB_COMMANDS and job_id is not None:
        raise CommandRefused(f"a {command.value} command names no job")
    return SignedCommand(node_id, job_id, CommandType(command), dict(args), expires, nonce)


class NonceStore:
    """Nonces of commands this agent accepted, kept until their envelope expires,
    in the state directory (so a restarted agent still refuses a replay)."""

    FILE = "command-nonces.json"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.FILE

    _lock = threading.Lock()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}

    def seen(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._read()

    def remember(self, nonce: str, expires: int, *, now: float | None = None) -> bool:
        """Record a nonce; False if it was already there (a replay)."""
        current = now if now is not None else time.time()
        with self._lock:
            known = {k: v for k, v in self._read().items() if v >= current}
            if nonce in known:
                return False
            known[nonce] = expires
            write_json_atomic(self.path, known)
            return True

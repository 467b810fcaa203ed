"""A compromised node on the broker, as a separate process: it holds one agent's
environment (broker URL and that node's own key) and nothing of the dashboard.

    python -m tests.security.attacker capture OUT VICTIM SECONDS
        take the victim's reports off the `dashboard` queue for a while (any other
        message is put straight back) and keep their raw bytes in OUT
    python -m tests.security.attacker attack SPEC_JSON
        order the victim to downgrade in every way an agent's credentials allow,
        then push the captured reports back onto the queue, raw, several times
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import redis

from themis_dashboard.celery import app
from updates.engine.commands import CommandType, sign_command
from updates.engine.reports import HEARTBEAT_QUEUE

# Where agents send reports: job reports, and heartbeats on a queue of their own.
QUEUES = ("dashboard", HEARTBEAT_QUEUE)
CAPTURE_ENOUGH = 3


def _claims(raw: bytes, victim: str) -> bool:
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        envelope = body[1].get("envelope") or {}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return isinstance(envelope, dict) and envelope.get("node_id") == victim


def capture(out: Path, victim: str, seconds: float) -> None:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    captured: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    # Ingesters take heartbeats off the same queue: wait until a few of the victim's are won.
    while time.monotonic() < deadline and len(captured) < CAPTURE_ENOUGH:
        item = client.brpop(list(QUEUES), timeout=1)
        if item is None:
            continue
        queue = item[0].decode() if isinstance(item[0], bytes) else str(item[0])
        raw = item[1] if isinstance(item[1], bytes) else str(item[1]).encode()
        if _claims(raw, victim):
            captured.append((queue, base64.b64encode(raw).decode()))
        else:
            client.rpush(queue, raw)  # not ours to keep: back where it was taken from
    out.write_text(json.dumps(captured))


def attack(spec: dict[str, Any]) -> None:
    own_key = bytes.fromhex(os.environ["THEMIS_NODE_KEY"])
    victim, queue = spec["victim"], f"node.{spec['victim']}"
    downgrade = {
        "sha256": spec["sha256"],
        "artifact_url": spec["artifact_url"],
        "download_token": spec["download_token"],
        "version": spec["version"],
        "allow_downgrade": True,
    }
    expires = time.time() + 300
    orders: list[tuple[str, dict[str, Any]]] = [
        # The old, unsigned form with the fields the dashboard never sends.
        (
            "agent.apply",
            {
                "job_id": spec["job_id"],
                "node_id": victim,
                "sha256": spec["sha256"],
                "bundle_path": spec["bundle_path"],
                "allow_downgrade": True,
                "version": spec["version"],
            },
        ),
        # Signed with the only key this node has, naming the victim.
        (
            "agent.apply",
            {
                "envelope": sign_command(
                    own_key,
                    node_id=victim,
                    job_id=spec["job_id"],
                    command=CommandType.APPLY,
                    args=downgrade,
                    expires=expires,
                )
            },
        ),
        # Signed for itself, delivered to the victim's queue.
        (
            "agent.rollback",
            {
                "envelope": sign_command(
                    own_key,
                    node_id=spec["attacker"],
                    job_id=spec["job_id"],
                    command=CommandType.ROLLBACK,
                    args={"point_id": None},
                    expires=expires,
                )
            },
        ),
    ]
    for task, kwargs in orders:
        app.send_task(task, kwargs=kwargs, queue=queue)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    stored = json.loads(Path(spec["captured"]).read_text())
    captured = [(queue, base64.b64decode(item)) for queue, item in stored]
    for _ in range(spec["replays"]):
        for queue, raw in captured:
            client.lpush(queue, raw)
    print(json.dumps({"orders": len(orders), "replayed": len(captured) * spec["replays"]}))


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    else:
        attack(json.loads(sys.argv[2]))

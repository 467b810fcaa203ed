"""The NodeTransport seam (DESIGN.md): how the dashboard reaches a node's agent.

The real one sends Celery tasks to the node's own queue `node.<id>`; service
tests may inject a recording fake instead. Answers come back asynchronously
as tasks on the `dashboard` queue (progress, finish, heartbeat)."""

from __future__ import annotations

import time
from typing import Any

from celery import current_app

from updates.engine.commands import TASK_FOR, CommandType, sign_command
from updates.engine.protocols import NodeTransport
from updates.models import Node

# A health request is worth nothing later: it expires soon.
HEALTH_REQUEST_SECONDS = 60

__all__ = ["CeleryNodeTransport", "NodeTransport", "default_transport"]


class CeleryNodeTransport:
    def __init__(self, app: Any = None) -> None:
        self.app = app  # default: the current Celery app (the project's), at send time

    def _send(self, node_id: str, task: str, kwargs: dict[str, Any]) -> None:
        (self.app or current_app).send_task(task, kwargs=kwargs, queue=f"node.{node_id}")

    def send_command(self, node_id: str, task: str, envelope: dict[str, Any]) -> None:
        """A signed command (updates.engine.commands): the envelope is the task's only
        argument, so nothing outside the signature reaches the agent."""
        self._send(node_id, task, {"envelope": envelope})

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        self._send(node_id, "agent.apply", {"job_id": job_id, "node_id": node_id, **options})

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self._send(
            node_id, "agent.rollback", {"job_id": job_id, "node_id": node_id, "point_id": point_id}
        )

    def set_traffic_role(self, node_id: str, role: str) -> None:
        """Blue/green: tell a node whether it now takes traffic."""
        self._send(node_id, "agent.set_traffic_role", {"node_id": node_id, "role": role})

    def health_check(self, node_id: str) -> dict[str, Any]:
        """Ask the agent for a heartbeat now (it carries the node's health), signed with
        the node's key like every command; nothing is sent to a node whose key is revoked."""
        key = (
            Node.objects.filter(node_id=node_id, agent_key_revoked=False)
            .values_list("agent_key", flat=True)
            .first()
        )
        if not key:
            return {"requested": False, "reason": "unknown node, or its key is revoked"}
        envelope = sign_command(
            bytes.fromhex(key),
            node_id=node_id,
            job_id=None,
            command=CommandType.HEARTBEAT,
            args={},
            expires=time.time() + HEALTH_REQUEST_SECONDS,
        )
        self.send_command(node_id, TASK_FOR[CommandType.HEARTBEAT], envelope)
        return {"requested": True}


def default_transport() -> NodeTransport:
    return CeleryNodeTransport()

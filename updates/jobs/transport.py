"""The NodeTransport seam (DESIGN.md): how the dashboard reaches a node's agent.

The real one sends Celery tasks to the node's own queue `node.<id>`; service
tests may inject a recording fake instead. Answers come back asynchronously
as tasks on the `dashboard` queue (progress, finish, heartbeat)."""

from __future__ import annotations

from typing import Any

from updates.engine.protocols import NodeTransport

__all__ = ["CeleryNodeTransport", "NodeTransport", "default_transport"]


class CeleryNodeTransport:
    def __init__(self, app: Any = None) -> None:
        self.app = app  # default: the project's Celery app

    def _send(self, node_id: str, task: str, kwargs: dict[str, Any]) -> None:
        if self.app is None:
            from themis_dashboard.celery import app as project_app

            self.app = project_app
        self.app.send_task(task, kwargs=kwargs, queue=f"node.{node_id}")

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
        # The agent answers with an immediate heartbeat carrying its health.
        self._send(node_id, "agent.heartbeat_now", {"node_id": node_id})
        return {"requested": True}


def default_transport() -> NodeTransport:
    return CeleryNodeTransport()

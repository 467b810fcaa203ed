"""Per-node agent keys, stored per node: made when the node is created, rotated or
revoked one node at a time by an operator. The key itself never leaves through a
page or a log line; the node page shows its fingerprint."""

from __future__ import annotations

import hashlib
from typing import Any

from django.db import transaction
from django.utils import timezone

from updates.audit import event_log
from updates.models import Node, new_agent_key


def node_key(node_id: str) -> bytes | None:
    """The key of a node whose key is in force, or None (no such node, or revoked)."""
    row = Node.objects.filter(node_id=node_id).values_list("agent_key", "agent_key_revoked").first()
    if row is None or row[1]:
        return None
    return bytes.fromhex(row[0])


def node_key_hex(node_id: str) -> str:
    """What an agent is given as THEMIS_NODE_KEY ("" when the node has no usable key)."""
    key = node_key(node_id)
    return key.hex() if key is not None else ""


def key_fingerprint(key_hex: str) -> str:
    """A short, non-secret name for a key (what pages and the audit log show)."""
    return hashlib.sha256(f"themis-node-key:{key_hex}".encode()).hexdigest()[:16]


def node_key_rotate(*, node: Node, user: Any) -> str:
    """Give the node a new key (also un-revokes it); returns the new fingerprint. The
    node's agent must be given the new key (manage.py node_key) before it is heard again."""
    key = new_agent_key()
    with transaction.atomic():
        old = Node.objects.select_for_update().values_list("agent_key", flat=True).get(pk=node.pk)
        Node.objects.filter(pk=node.pk).update(
            agent_key=key, agent_key_revoked=False, agent_key_changed_at=timezone.now()
        )
        event_log(
            verb="node.key_rotated",
            actor=user,
            tenant=node.tenant_id,
            obj=node,
            details={
                "node_id": node.node_id,
                "old_fingerprint": key_fingerprint(old),
                "fingerprint": key_fingerprint(key),
            },
        )
    return key_fingerprint(key)


def node_key_revoke(*, node: Node, user: Any) -> bool:
    """Revoke the node's key; False if it was revoked already."""
    with transaction.atomic():
        revoked = Node.objects.filter(pk=node.pk, agent_key_revoked=False).update(
            agent_key_revoked=True, agent_key_changed_at=timezone.now()
        )
        if revoked:
            key = Node.objects.values_list("agent_key", flat=True).get(pk=node.pk)
            event_log(
                verb="node.key_revoked",
                actor=user,
                tenant=node.tenant_id,
                obj=node,
                details={"node_id": node.node_id, "fingerprint": key_fingerprint(key)},
            )
    return bool(revoked)

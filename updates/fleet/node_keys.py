"""Per-node report keys, derived from the dashboard's secret: nothing to store,
and changing SECRET_KEY rotates every node's key at once."""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings


def node_key(node_id: str) -> bytes:
    return hmac.new(
        settings.SECRET_KEY.encode(), f"themis-node-report:{node_id}".encode(), hashlib.sha256
    ).digest()


def node_key_hex(node_id: str) -> str:
    """What an agent is given as THEMIS_NODE_KEY."""
    return node_key(node_id).hex()

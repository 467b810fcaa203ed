"""Publishing a signed trust store to the fleet (updates.engine.truststore), and which
nodes have it.

The dashboard checks a store as a node would, against the newest store it published (or,
before the first, the nodes' bootstrap anchor, THEMIS_TRUST_ANCHOR): a store no node would
take is refused here, with the node's reason, and nothing is offered. A published store is
offered to every node not on it yet, through the outbox (a command per node, re-sent until
a heartbeat shows the version); the page lists the nodes that have not taken it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import transaction

from updates.audit import event_log
from updates.engine.errors import EngineError
from updates.engine.truststore import check_trust_store
from updates.jobs import outbox
from updates.models import Node, TrustStoreVersion
from updates.releases.trust import published_trust

# The nodes behind the newest store a page lists by name (the rest are counted).
LISTED_BEHIND = 100


class TrustStoreRefused(ValueError):
    """A store no node would take; the message says why, as the node would."""


@transaction.atomic
def trust_store_publish(*, envelope: bytes, user: Any) -> TrustStoreVersion:
    """Check `envelope` as the nodes will, record it, and offer it to every node."""
    current, version = published_trust()
    try:
        store = check_trust_store(envelope, current=current, current_version=version)
        text = envelope.decode("ascii")
    except EngineError as err:
        raise TrustStoreRefused(f"{err} (exit {err.exit_code} on a node)") from None
    except UnicodeDecodeError:
        raise TrustStoreRefused("not a trust store envelope (not ASCII JSON)") from None
    trust = store.trust
    published = TrustStoreVersion.objects.create(
        version=store.version,
        envelope=text,
        expires=store.expires,
        signer=store.signer[:255],
        roots=[root.subject.rfc4514_string() for root in trust.roots],
        revoked=len(trust.revoked_serials) + len(trust.revoked_fingerprints),
        created_by=user,
    )
    offered = outbox.commands_trust_store(
        published, Node.objects.filter(agent_key_revoked=False).exclude(agent_key="")
    )
    event_log(
        verb="trust_store.published",
        actor=user,
        obj=published,
        details={
            "version": published.version,
            "expires": published.expires.isoformat(),
            "roots": published.roots,
            "revoked": published.revoked,
            "signer": published.signer,
            "offered_to": offered,
        },
    )
    return published


@dataclass(frozen=True)
class TrustStoreCoverage:
    """How far the fleet (as a user sees it) has taken the newest store."""

    latest: TrustStoreVersion | None
    on_latest: int
    behind: int
    unreadable: int  # nodes that report a store they cannot read
    behind_nodes: list[Node]


def trust_store_coverage(user: Any) -> TrustStoreCoverage:
    latest = TrustStoreVersion.objects.first()
    nodes = Node.objects.visible_to(user)
    version = latest.version if latest else 0
    behind = nodes.filter(trust_store_version__lt=version)
    return TrustStoreCoverage(
        latest=latest,
        on_latest=nodes.filter(trust_store_version__gte=version).count(),
        behind=behind.count(),
        unreadable=nodes.filter(trust_store_version=-1).count(),
        behind_nodes=list(
            behind.only("node_id", "tenant", "trust_store_version", "last_heartbeat")
            .select_related("tenant")
            .order_by("trust_store_version", "node_id")[:LISTED_BEHIND]
        ),
    )

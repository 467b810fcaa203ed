"""What the fleet is to trust now, for every check the dashboard makes of a signature."""

from __future__ import annotations

from django.conf import settings

from updates.engine.cms import Trust, load_trust
from updates.engine.truststore import parse_trust_store
from updates.models import TrustStoreVersion


def published_trust() -> tuple[Trust, int]:
    """The newest published trust store's trust and version, else the nodes' bootstrap
    root (THEMIS_TRUST_ANCHOR) and 0: a release signed by a certificate the fleet revoked
    is refused at upload, as every node would refuse it."""
    latest = TrustStoreVersion.objects.first()
    if latest is None:
        return load_trust(settings.THEMIS_TRUST_ANCHOR), 0
    return parse_trust_store(latest.envelope.encode()).trust, latest.version

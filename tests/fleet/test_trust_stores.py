"""Trust stores across the fleet: the dashboard checks a store as a node would and offers
it to every node through the outbox; heartbeats say which version each node runs (both
heartbeat paths), which acknowledges the offer; the page lists the nodes not on it yet; the
agent takes a store offered by a signed command and refuses one it must not take."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tenants.roles import OPERATOR
from tests.conftest import Fleet
from tests.factories import make_user
from tests.helpers import MakeBundle
from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine.commands import CommandType
from updates.engine.devpki import KeyPair, Pki
from updates.engine.reports import ReportType, sign_report, verify_report
from updates.engine.truststore import TRUST_STORE_FILE, make_trust_store, trust_store_version
from updates.fleet import ingest
from updates.fleet.liveness import LIVENESS_KEY, Liveness
from updates.fleet.services import Heartbeat, node_record_heartbeat
from updates.fleet.trust_stores import TrustStoreRefused, trust_store_publish
from updates.jobs import outbox
from updates.models import Event, Node, NodeCommand, Release, TrustStoreVersion
from updates.releases.services import ReleaseRejected, release_publish
from workers import agent

pytestmark = pytest.mark.django_db
KEY = bytes.fromhex("cd" * 32)
NODES = ("a-1", "a-solo", "b-1")


def _store(pki: Pki, version: int, *, signer: KeyPair | None = None, **extra: Any) -> bytes:
    return make_trust_store(
        version=version,
        expires=datetime.now(UTC) + timedelta(days=30),
        roots=[x509.load_pem_x509_certificate(pki.root.read_bytes())],
        key_path=(signer or pki.store_signer).key,
        cert_path=(signer or pki.store_signer).cert,
        chain_path=pki.chain,
        **extra,
    )


@pytest.fixture
def keyed(fleet: Fleet) -> Fleet:
    """Every node of the fleet has an agent key (commands go to keyed nodes only)."""
    Node.objects.update(agent_key=KEY.hex())
    return fleet


def _offers() -> list[tuple[str, int, str]]:
    return sorted(
        (c.node.node_id, c.args["store_version"], c.state)
        for c in NodeCommand.objects.filter(kind=NodeCommand.Kind.TRUST_STORE)
    )


def test_a_store_is_checked_recorded_and_offered_to_every_node(trusted: Pki, keyed: Fleet) -> None:
    published = trust_store_publish(envelope=_store(trusted, 1), user=None)
    assert published.version == 1 and published.revoked == 0
    assert published.roots == [
        x509.load_pem_x509_certificate(trusted.root.read_bytes()).subject.rfc4514_string()
    ]
    assert _offers() == [("a-1", 1, "PENDING"), ("a-solo", 1, "PENDING"), ("b-1", 1, "PENDING")]
    event = Event.objects.get(verb="trust_store.published")
    assert event.details["offered_to"] == 3 and event.details["version"] == 1

    # Version 2 supersedes the open offers of version 1.
    trust_store_publish(envelope=_store(trusted, 2), user=None)
    states = {(node, version): state for node, version, state in _offers()}
    assert states[("a-1", 1)] == "ABANDONED" and states[("a-1", 2)] == "PENDING"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("older", r"not newer than the installed 3 \(exit 13 on a node\)"),
        ("untrusted", "certificate chain rejected"),
        ("release-signer", "lacks the trust-store signing extended key usage"),
        ("junk", "not a trust store envelope"),
    ],
)
def test_a_store_no_node_would_take_is_refused_and_nothing_is_offered(
    trusted: Pki, keyed: Fleet, case: str, words: str
) -> None:
    trust_store_publish(envelope=_store(trusted, 3), user=None)
    NodeCommand.objects.all().delete()
    offered: dict[str, Callable[[], bytes]] = {
        "older": lambda: _store(trusted, 2),
        "untrusted": lambda: _store(trusted, 4, signer=trusted.next_store_signer),
        "release-signer": lambda: _store(trusted, 4, signer=trusted.leaf),
        "junk": lambda: b"{}",
    }
    envelope = offered[case]()
    with pytest.raises(TrustStoreRefused, match=words):
        trust_store_publish(envelope=envelope, user=None)
    assert list(TrustStoreVersion.objects.values_list("version", flat=True)) == [3]
    assert not NodeCommand.objects.exists()


def _heartbeat(node_id: str, version: int) -> Heartbeat:
    return Heartbeat.from_payload({"node_id": node_id, "trust_store_version": version})


def test_a_heartbeat_records_the_nodes_store_and_acknowledges_the_offer(
    trusted: Pki, keyed: Fleet
) -> None:
    trust_store_publish(envelope=_store(trusted, 1), user=None)
    node_record_heartbeat(heartbeat=_heartbeat("a-1", 1))
    node_record_heartbeat(heartbeat=_heartbeat("b-1", -1))  # it cannot read its store
    assert dict(Node.objects.values_list("node_id", "trust_store_version")) == {
        "a-1": 1,
        "a-solo": 0,
        "b-1": -1,
    }
    assert _offers() == [("a-1", 1, "ACKED"), ("a-solo", 1, "PENDING"), ("b-1", 1, "PENDING")]
    client = Client()
    client.force_login(make_user(username="root-admin", is_superuser=True))
    pages = {n: client.get(reverse("node_detail", args=[n])).content.decode() for n in NODES}
    assert '<dd id="trust-store-version">version 1</dd>' in pages["a-1"]
    assert "none: its bootstrap root only" in pages["a-solo"]
    assert "unreadable on the node" in pages["b-1"]
    with pytest.raises(ValueError, match="trust_store_version"):
        _heartbeat("a-1", -2)


@pytest.fixture
def liveness(redis_url: str) -> Iterator[Liveness]:
    """The batch path's Redis liveness, emptied afterwards: times left there would tell a
    later test's offline check these nodes were just heard of."""
    client = redis.Redis.from_url(redis_url)
    yield Liveness(client)
    client.delete(LIVENESS_KEY)


def test_the_batch_heartbeat_path_acknowledges_the_offer_too(
    trusted: Pki, keyed: Fleet, liveness: Liveness
) -> None:
    trust_store_publish(envelope=_store(trusted, 1), user=None)
    payloads = [
        {"node_id": "a-1", "installed_version": "1.0.0", "trust_store_version": 1},
        {"node_id": "b-1", "installed_version": "1.0.0", "trust_store_version": 0},
    ]
    envelopes = [sign_report(KEY, ReportType.HEARTBEAT, p, seq=10**12) for p in payloads]
    outcome = ingest.heartbeats_record_batch(envelopes, now=timezone.now(), liveness=liveness)
    assert outcome.refused == 0
    assert dict(Node.objects.values_list("node_id", "trust_store_version")) == {
        "a-1": 1,
        "a-solo": 0,
        "b-1": 0,
    }
    assert _offers() == [("a-1", 1, "ACKED"), ("a-solo", 1, "PENDING"), ("b-1", 1, "PENDING")]


class _Recording:
    """A transport that records the trust stores it is asked to offer."""

    def __init__(self) -> None:
        self.offered: list[tuple[str, int, str]] = []

    def install_trust_store(self, node_id: str, version: int, store: str) -> None:
        self.offered.append((node_id, version, store))

    def update_node(self, node_id: str, job_id: str, **options: object) -> None:
        raise AssertionError("no job here")

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        raise AssertionError("no job here")

    def health_check(self, node_id: str) -> dict[str, object]:
        return {}


def test_the_relay_sends_each_node_the_store_itself(trusted: Pki, keyed: Fleet) -> None:
    envelope = _store(trusted, 1)
    trust_store_publish(envelope=envelope, user=None)
    transport = _Recording()
    outbox.relay_commands(
        list(NodeCommand.objects.values_list("pk", flat=True)), transport=transport
    )
    assert sorted(n for n, _, _ in transport.offered) == ["a-1", "a-solo", "b-1"]
    assert {(v, s) for _, v, s in transport.offered} == {(1, envelope.decode())}


def test_the_page_lists_the_nodes_not_on_the_newest_store(
    trusted: Pki, keyed: Fleet, roles: None
) -> None:
    manager = make_user(username="rita")
    manager.groups.add(Group.objects.get(name=OPERATOR))
    client = Client()
    client.force_login(manager)
    url = reverse("trust_store")
    upload = SimpleUploadedFile("store-1.json", _store(trusted, 1))
    response = client.post(url, {"store": upload}, follow=True)
    assert "Trust store version 1 published to the fleet." in response.content.decode()
    Node.objects.filter(node_id="a-1").update(trust_store_version=1)
    body = client.get(url).content.decode()
    assert (
        "1 node on it" in body
        and '<span class="pill status-offline" id="trust-behind">2 not yet' in body
    )
    behind = body[body.index('id="trust-behind-nodes"') :]
    assert 'data-node="a-solo"' in behind and 'data-node="b-1"' in behind
    assert 'data-node="a-1"' not in behind
    refused = client.post(url, {"store": SimpleUploadedFile("old.json", _store(trusted, 1))})
    assert refused.status_code == 400
    assert "Refused: trust store: version 1 is not newer than the installed 1" in (
        refused.content.decode()
    )


def test_only_release_publishers_see_and_publish_trust(personas: dict[str, Client]) -> None:
    for persona in ("admin_a", "responder"):
        assert personas[persona].get(reverse("trust_store")).status_code == 403


def test_the_agent_takes_an_offered_store_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_pki: Pki
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    env = {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(tmp_path / "install"),
        "THEMIS_STATE_DIR": str(tmp_path / "state"),
        "THEMIS_NODE_KEY": KEY.hex(),
        "THEMIS_TRUST_ANCHOR": str(test_pki.root),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "state").mkdir()
    state = tmp_path / "state"

    def offer(version: int, envelope: bytes) -> None:
        args = {"store_version": version, "store": envelope.decode()}
        command = signed_command(KEY, "n1", CommandType.TRUST_STORE, args)
        agent.install_trust_store_command(envelope=command)

    offer(2, _store(test_pki, 2))
    assert trust_store_version(state) == 2
    before = (state / TRUST_STORE_FILE).read_bytes()
    offer(1, _store(test_pki, 1))  # older: refused, nothing written
    offer(3, _store(test_pki, 3, signer=test_pki.leaf))  # not a trust-store signer
    assert (state / TRUST_STORE_FILE).read_bytes() == before
    beats = [
        verify_report(KEY, kwargs["envelope"], expected_type=ReportType.HEARTBEAT).payload
        for kwargs in sent
    ]
    assert [beat["trust_store_version"] for beat in beats] == [2, 2, 2]


def test_a_release_signed_by_a_revoked_certificate_is_refused_at_upload_too(
    trusted: Pki, keyed: Fleet, make_bundle: MakeBundle, tmp_path: Path
) -> None:
    """The dashboard checks uploads against the fleet's newest trust store, so it never
    publishes a release every node would refuse."""
    bundle = make_bundle("1.8.0", signer=trusted.leaf, chain=trusted.chain)
    leaf = x509.load_pem_x509_certificate(trusted.leaf.cert.read_bytes())
    trust_store_publish(envelope=_store(trusted, 1, revoked_certificates=[leaf]), user=None)
    upload = SimpleUploadedFile(bundle.name, bundle.read_bytes())
    with pytest.raises(ReleaseRejected, match="is revoked by trust store version 1"):
        release_publish(upload=upload, user=None)
    assert not Release.objects.exists()
    # Another signer under the same root still publishes.
    other = make_bundle("1.8.1", signer=trusted.ec_leaf, chain=trusted.chain)
    published = release_publish(
        upload=SimpleUploadedFile(other.name, other.read_bytes()), user=None
    )
    assert published.version == "1.8.1"

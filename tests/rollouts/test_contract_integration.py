"""Expand/contract end to end: the demo 1.1.0 release (expand 0001: orders get a status;
contract 0002: legacy_note dropped after a grace period) rolled out on a 3-node cluster
through real agents, each node running the demo service on its own SQLite node database
under its supervisor. Expand runs inside each node's update; contract only once every node
of the cluster runs 1.1.0, and the drop only hides the column until its grace ends."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests import procs
from tests.factories import make_cluster, make_node, make_tenant
from tests.fleet_stack import RealFleet, StartFleet
from themis_dashboard.demo import fleet as demo
from updates.engine.bundle import create_bundle
from updates.engine.devpki import Pki
from updates.models import Event, Node, Rollout, RolloutNode, UpdateJob
from updates.releases.services import release_publish
from updates.rollouts import services as rollouts

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _demo_bundle(tmp_path: Path, pki: Pki, version: str) -> Path:
    """The demo release as `make run` builds it (its tree, its migrations, its checks but
    the timing one), signed with the test PKI the agents trust."""
    src = tmp_path / f"demo-src-{version}"
    demo.demo_tree(src, version)
    # The demo's smoke and integration checks (the latter reads orders by status: the
    # expand migration must have run before the new code started); its latency check is
    # left out, a loaded test machine is no place to time p99 against a 5x factor.
    checks = {k: v for k, v in demo.demo_verify(version).items() if k != "performance"}
    out = tmp_path / f"themisdb-{version}.tar.zst"
    create_bundle(
        src,
        product="themisdb",
        version=version,
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        expires_days=30,
        out_path=out,
        extra_manifest={"verify": checks, "migrations": demo.demo_migration_refs()},
    )
    return out


def _columns(real: RealFleet, node: Node) -> list[str]:
    database = real.tmp / node.node_id / "state" / "data" / "themis.db"
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)  # never creates it
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(orders)")]
    finally:
        conn.close()


def _has_column(real: RealFleet, node: Node, column: str) -> bool:
    try:
        return column in _columns(real, node)
    except sqlite3.Error:  # not made yet
        return False


def test_expand_contract_rollout_of_the_demo_release_on_a_cluster(
    real_fleet: StartFleet, trusted: Pki, tmp_path: Path
) -> None:
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant, name="main")
    nodes = [
        make_node(
            node_id=f"db-{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.0.0",
            raft_role="leader" if i == 0 else "follower",
        )
        for i in range(3)
    ]
    real = real_fleet(nodes, services=True, base_version="1.0.0")
    for node in nodes:  # the 1.0.0 service made its database: no status column yet
        assert procs.wait_until(partial(_has_column, real, node, "legacy_note"), 30), real.logs()
        assert "status" not in _columns(real, node)
    # Published as an upload is: verified, its manifest (and so its migrations) stored.
    bundle = _demo_bundle(tmp_path, trusted, "1.1.0")
    release = release_publish(
        upload=SimpleUploadedFile(bundle.name, bundle.read_bytes()), user=None
    )
    assert [m["phase"] for m in release.manifest["migrations"]] == ["expand", "contract"]
    rollout = rollouts.rollout_create(release=release, strategy="rolling", nodes=nodes, user=None)
    rollouts.rollout_start(rollout=rollout, user=None)

    def expand_before_contract() -> bool:
        """While any node still runs 1.0.0, no node has been contracted."""
        current = Rollout.objects.get(pk=rollout.pk)
        versions = set(Node.objects.values_list("installed_version", flat=True))
        if versions != {"1.1.0"}:
            assert not UpdateJob.objects.filter(kind="contract").exists()
            for node in nodes:
                assert "legacy_note" in _columns(real, node)
        return current.state in {"COMPLETED", "FAILED"}

    assert procs.wait_until(expand_before_contract, 240, 0.3), real.logs()
    rollout.refresh_from_db()
    assert rollout.state == "COMPLETED", f"{rollout.error_message}\n{real.logs()}"

    for node in nodes:
        columns = _columns(real, node)
        assert "status" in columns  # expand, in each node's update
        assert "legacy_note" not in columns  # contract: hidden...
        assert any(c.startswith("_themis_dropped") for c in columns)  # ...its data kept
    contract = UpdateJob.objects.filter(rollout=rollout, kind="contract")
    assert sorted(contract.values_list("node__node_id", flat=True)) == ["db-0", "db-1", "db-2"]
    assert set(contract.values_list("state", flat=True)) == {"DONE"}
    last_update = UpdateJob.objects.filter(rollout=rollout, kind="update").latest("finished_at")
    assert last_update.node.node_id == "db-0"  # the leader last
    first_contract = contract.earliest("created_at")
    assert last_update.finished_at is not None
    assert first_contract.created_at >= last_update.finished_at
    assert set(
        RolloutNode.objects.filter(rollout=rollout).values_list("contract_state", flat=True)
    ) == {"DONE"}
    completed = Event.objects.get(verb="rollout.completed", object_id=str(rollout.pk))
    assert completed.details["contract_done"] == 3

    # The node page's data comes with the heartbeats: version and history.
    def schema_reported() -> bool:
        return all(
            n.schema_version == "0002"
            and [h["version"] for h in n.schema_history][-2:] == ["0001", "0002"]
            for n in Node.objects.all()
        )

    assert procs.wait_until(schema_reported, 30, 0.3), list(
        Node.objects.values_list("node_id", "schema_version", "schema_history")
    )

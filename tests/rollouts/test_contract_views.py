"""Expand/contract on the rollout pages: the plan lists which migrations run at which
step, the rollout shows each node's contract job; a tenant admin sees only their own."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport, answer_queued_jobs
from updates.jobs import services as jobs
from updates.models import Cluster, Release, Rollout, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts

pytestmark = pytest.mark.django_db

Personas = dict[str, Client]
MIGRATIONS = [{"version": "0001", "phase": "expand"}, {"version": "0002", "phase": "contract"}]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def release(db: None) -> Release:
    return make_release(
        version="1.1.0",
        sha256="ab" * 32,
        artifact="releases/x.tar",
        manifest={"version": "1.1.0", "migrations": MIGRATIONS},
    )


@pytest.fixture
def cluster_b(fleet: Fleet) -> Cluster:
    cluster = make_cluster(tenant=fleet.tenant_b, name="b-main")
    for i, role in enumerate(["follower", "follower", "leader"]):
        make_node(
            node_id=f"bm-{i}",
            tenant=fleet.tenant_b,
            cluster=cluster,
            raft_role=role,
            installed_version="1.0.0",
        )
    return cluster


def _form(release: Release, **extra: str | int) -> dict[str, str | int]:
    data: dict[str, str | int] = {
        "release": release.pk,
        "strategy": "rolling",
        "stages": "100",
        "max_error_rate": "5",
        "max_p99_ms": "500",
        "max_unavailable": "1",
        "health_timeout": "30",
        "rollback_on_failure": "on",
    }
    data.update(extra)
    return data


def _steps(body: str) -> list[str]:
    section = body[body.index('id="schema-steps"') :]
    section = section[: section.index("</ul>")]
    return [item.split(">", 1)[1] for item in section.split("</li>")[:-1] if ">" in item]


def test_the_plan_lists_which_migrations_run_at_which_step(
    personas: Personas, release: Release, cluster_b: Cluster, fleet: Fleet
) -> None:
    response = personas["operator"].post(
        reverse("rollout_new"),
        _form(release, tenant=fleet.tenant_b.pk, preview="1", contract_delay="600"),
    )
    assert response.status_code == 200
    body = response.content.decode()
    steps = [s.split(">", 1)[-1] for s in _steps(body)]
    assert steps == [
        "expand 0001 — in each node&#x27;s update",
        # In plan order: the standalone node comes first (a rolling plan orders by cluster).
        "contract 0002 — after node b-1 runs 1.1.0 (+10 min)",
        "contract 0002 — after every node of cluster b-main runs 1.1.0 (+10 min)",
    ]
    assert not Rollout.objects.exists()


def test_a_release_without_migrations_lists_none(personas: Personas, cluster_b: Cluster) -> None:
    plain = make_release(version="1.1.0", sha256="ab" * 32, artifact="releases/y.tar")
    body = (
        personas["operator"]
        .post(reverse("rollout_new"), _form(plain, cluster=cluster_b.pk, preview="1"))
        .content.decode()
    )
    assert 'id="plan"' in body and 'id="schema-steps"' not in body


def test_the_contract_delay_is_checked_and_stored(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    bad = personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1", contract_delay="-5")
    )
    assert bad.status_code == 400 and not Rollout.objects.exists()
    ok = personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1", contract_delay="90")
    )
    assert ok.status_code == 302
    assert Rollout.objects.get().opts.contract_delay == 90


def _contracting(release: Release, cluster_b: Cluster) -> Rollout:
    """A rollout of the cluster whose updates are done and contract jobs started."""
    rollout = rollouts.rollout_create(
        release=release, strategy="rolling", nodes=list(cluster_b.nodes.all()), user=None
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk)
        if UpdateJob.objects.filter(kind="contract").exists():
            break
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == "RUNNING"
    return rollout


def test_the_rollout_shows_each_nodes_contract_job(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    rollout = _contracting(release, cluster_b)
    body = personas["operator"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    assert "contract 0002 — after every node of cluster b-main runs 1.1.0" in body
    for job in UpdateJob.objects.filter(kind="contract"):
        row = body[body.index(f'data-node="{job.node.node_id}"') :]
        row = row[: row.index("</tr>")]
        assert 'data-contract="RUNNING"' in row and f"job {job.pk}: QUEUED" in row
    answer_queued_jobs(contract_failures={"bm-1": "disk full"})
    coordinator.rollout_drive(rollout.pk)
    body = personas["operator"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    assert 'data-contract="FAILED"' in body and "MIGRATION_FAILED disk full" in body
    assert "contract migrations failed on bm-1" in body  # the rollout's reason
    assert "Retry failed nodes" in body


def test_a_tenant_admin_sees_only_their_nodes_contract_steps(
    personas: Personas, release: Release, cluster_b: Cluster, fleet: Fleet
) -> None:
    nodes = [*cluster_b.nodes.all(), fleet.node_a_standalone]
    rollout = rollouts.rollout_create(release=release, strategy="rolling", nodes=nodes, user=None)
    body = personas["admin_a"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    assert "after node a-solo runs 1.1.0" in body
    assert "b-main" not in body

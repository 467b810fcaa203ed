"""Rollout pages and actions, per persona: status codes and database state."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import Cluster, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts

pytestmark = pytest.mark.django_db

Personas = dict[str, Client]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture
def cluster_b(fleet: Fleet) -> Cluster:
    cluster = make_cluster(tenant=fleet.tenant_b, name="b-main")
    for i, role in enumerate(["follower", "follower", "leader"]):
        make_node(
            node_id=f"bm-{i}",
            tenant=fleet.tenant_b,
            cluster=cluster,
            raft_role=role,
            installed_version="1.6.0",
        )
    return cluster


def _form(release: Release, **extra: str | int) -> dict[str, str | int]:
    data: dict[str, str | int] = {
        "release": release.pk,
        "strategy": "canary",
        "stages": "1, 5, 25, 100",
        "max_error_rate": "5",
        "max_p99_ms": "500",
        "max_unavailable": "1",
        "health_timeout": "30",
        "rollback_on_failure": "on",
    }
    data.update(extra)
    return data


def test_preview_shows_the_plan_and_saves_nothing(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    response = personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, preview="1")
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="plan"' in body and "bm-2" in body and 'id="start-rollout"' in body
    assert not Rollout.objects.exists()


def test_operator_starts_a_canary(personas: Personas, release: Release, cluster_b: Cluster) -> None:
    response = personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1")
    )
    rollout = Rollout.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("rollout_detail", args=[rollout.pk])
    assert rollout.state == Rollout.State.RUNNING
    assert rollout.created_by is not None
    assert rollout.created_by.username == "olivia"
    assert RolloutNode.objects.filter(rollout=rollout).count() == 3
    assert RolloutNode.objects.get(rollout=rollout, is_leader=True).position == 2


@pytest.mark.parametrize("persona", ["responder", "admin_a", "admin_b"])
def test_only_operators_start_rollouts(
    personas: Personas, release: Release, cluster_b: Cluster, persona: str
) -> None:
    response = personas[persona].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1")
    )
    assert response.status_code == 403
    assert not Rollout.objects.exists()


def test_bad_input_is_refused_with_reasons(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    response = personas["operator"].post(
        reverse("rollout_new"),
        _form(release, cluster=cluster_b.pk, stages="50, 10", version_filter="~~", start="1"),
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "percentages must increase" in body
    assert "is not a version specifier" in body
    assert not Rollout.objects.exists()


@pytest.mark.parametrize(
    ("field", "value", "label"),
    [
        ("max_error_rate", "-1", "Max error rate"),
        ("max_p99_ms", "-5", "Max p99 latency (ms)"),
        ("bake_seconds", "-30", "Bake"),
        ("max_unavailable", "0", "Max unavailable"),
        ("max_parallel", "-2", "Max nodes at once"),
        ("health_timeout", "-1", "Health timeout"),
        ("max_p99_ms", "fast", "Max p99 latency (ms)"),
    ],
)
def test_every_refused_field_is_named_with_its_reason(
    personas: Personas, release: Release, cluster_b: Cluster, field: str, value: str, label: str
) -> None:
    response = personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1", **{field: value})
    )
    assert response.status_code == 400
    body = response.content.decode()
    summary = body[body.index('id="form-errors"') :]
    named = summary[summary.index(f'data-field="{field}"') :]
    named = named[: named.index("</p>")]
    assert label.lower() in named.lower()
    assert "greater than or equal to" in named or "Enter a number" in named
    assert not Rollout.objects.exists()


def test_version_skew_refused_in_the_form(personas: Personas, cluster_b: Cluster) -> None:
    skewed = make_release(version="1.9.0")
    response = personas["operator"].post(
        reverse("rollout_new"), _form(skewed, cluster=cluster_b.pk, start="1")
    )
    assert response.status_code == 400
    assert "version skew" in response.content.decode()
    assert not Rollout.objects.exists()


@pytest.fixture
def awaiting(release: Release, cluster_b: Cluster) -> Rollout:
    nodes = list(cluster_b.nodes.all())
    rollout = rollouts.rollout_create(release=release, strategy="canary", nodes=nodes, user=None)
    rollouts.rollout_start(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    jobs.job_finish(
        job_id=job.pk, node_id=job.node.node_id, ok=True, result={"version_to": "1.7.0"}
    )
    # its first heartbeat after the update: the gate reads metrics from then on
    Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.AWAITING_APPROVAL
    return rollout


@pytest.mark.parametrize(
    ("persona", "status", "approved"),
    [
        ("responder", 302, True),
        ("operator", 302, True),
        ("admin_b", 403, False),
        ("admin_a", 403, False),
        ("anonymous", 302, False),
    ],
)
def test_approval_by_responders_and_operators(
    personas: Personas, awaiting: Rollout, persona: str, status: int, approved: bool
) -> None:
    response = personas[persona].post(reverse("rollout_approve", args=[awaiting.pk]))
    assert response.status_code == status
    awaiting.refresh_from_db()
    assert (awaiting.state == Rollout.State.RUNNING) is approved
    assert StageDecision.objects.filter(rollout=awaiting, decision="approved").exists() is approved


def test_responder_aborts(personas: Personas, awaiting: Rollout) -> None:
    assert (
        personas["responder"].post(reverse("rollout_abort", args=[awaiting.pk])).status_code == 302
    )
    awaiting.refresh_from_db()
    assert awaiting.state == Rollout.State.ABORTING
    assert (
        StageDecision.objects.get(rollout=awaiting, decision="aborted").decided_by_label == "rita"
    )


@pytest.mark.parametrize(
    ("persona", "status"),
    [("operator", 200), ("responder", 200), ("admin_b", 200), ("admin_a", 404)],
)
def test_rollout_detail_scoped_to_tenants(
    personas: Personas, awaiting: Rollout, persona: str, status: int
) -> None:
    response = personas[persona].get(reverse("rollout_detail", args=[awaiting.pk]))
    assert response.status_code == status
    if status == 200:
        body = response.content.decode()
        assert 'class="timeline"' in body and 'class="metrics"' in body


def test_tenant_admin_sees_rollouts_read_only(personas: Personas, awaiting: Rollout) -> None:
    body = personas["admin_b"].get(reverse("rollout_detail", args=[awaiting.pk])).content.decode()
    assert 'id="approve"' not in body and "Abort and roll back" not in body
    listing = personas["admin_b"].get(reverse("rollout_list")).content.decode()
    assert f'data-rollout="{awaiting.pk}"' in listing
    other = personas["admin_a"].get(reverse("rollout_list")).content.decode()
    assert f'data-rollout="{awaiting.pk}"' not in other


def test_detail_shows_approve_button_to_responder(personas: Personas, awaiting: Rollout) -> None:
    body = personas["responder"].get(reverse("rollout_detail", args=[awaiting.pk])).content.decode()
    assert 'id="approve"' in body
    partial = (
        personas["responder"]
        .get(reverse("rollout_detail", args=[awaiting.pk]), headers={"HX-Request": "true"})
        .content.decode()
    )
    assert partial.lstrip().startswith('<div id="rollout-live"')
    assert 'hx-trigger="sse:changed, themis:poll, every 5s"' in partial
    assert 'data-live-poll="500"' in partial
    assert f'sse-connect="{reverse("live_rollout", args=[awaiting.pk])}"' in body


def test_action_in_wrong_state_shows_error_and_changes_nothing(
    personas: Personas, awaiting: Rollout
) -> None:
    client = personas["operator"]
    response = client.post(reverse("rollout_resume", args=[awaiting.pk]), follow=True)
    assert "cannot go to RUNNING" in response.content.decode()
    awaiting.refresh_from_db()
    assert awaiting.state == Rollout.State.AWAITING_APPROVAL


def test_bake_time_and_parallel_cap_reach_the_rollout(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    data = _form(release, cluster=cluster_b.pk, start="1", bake_seconds="120", max_parallel="2")
    assert personas["operator"].post(reverse("rollout_new"), data).status_code == 302
    options = Rollout.objects.get().options
    assert options["gate"]["bake_seconds"] == 120
    assert options["max_parallel"] == 2


def test_a_failed_canary_says_why_on_its_page(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1")
    )
    rollout = Rollout.objects.get()
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    jobs.job_finish(
        job_id=job.pk,
        node_id=job.node.node_id,
        ok=False,
        error_code="HEALTH_CHECK_FAILED_ROLLED_BACK",
        error_message="health URL answered 500",
    )
    coordinator.rollout_drive(rollout.pk)
    body = personas["operator"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    reason = (
        f"node {job.node.node_id} failed its update "
        "(HEALTH_CHECK_FAILED_ROLLED_BACK: health URL answered 500)"
    )
    assert f'<p class="error">{reason}</p>' in body
    # The node's row shows what its agent reported, not a stale progress bar and step.
    row = body[body.index(f'data-node="{job.node.node_id}"') :]
    row = row[: row.index("</tr>")]
    assert "HEALTH_CHECK_FAILED_ROLLED_BACK: health URL answered 500" in row
    assert "<progress" not in row.split('class="contract"')[0]


def test_stage_labels_say_what_share_of_the_targeted_nodes_each_reaches(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1", stages="1, 100")
    )
    rollout = Rollout.objects.get()
    body = personas["operator"].get(reverse("rollout_detail", args=[rollout.pk])).content.decode()
    # The first stage asked for 1 %: its one node is a third of the cluster.
    assert "stage 1 · 1 node · 33 % of 3" in body
    assert "stage 2 · 2 nodes · 100 % of 3" in body


def test_four_eyes_keeps_the_starter_from_approving_and_lets_another(
    personas: Personas, awaiting: Rollout
) -> None:
    olivia = get_user_model().objects.get(username="olivia")
    options = {**awaiting.options, "four_eyes": True}
    Rollout.objects.filter(pk=awaiting.pk).update(options=options, created_by=olivia)
    starter = personas["operator"]
    page = starter.get(reverse("rollout_detail", args=[awaiting.pk])).content.decode()
    assert 'id="four-eyes"' in page and 'id="approve"' not in page
    refused = starter.post(reverse("rollout_approve", args=[awaiting.pk]), follow=True)
    assert "needs four eyes and you started it" in refused.content.decode()
    awaiting.refresh_from_db()
    assert awaiting.state == Rollout.State.AWAITING_APPROVAL
    refusal = StageDecision.objects.get(rollout=awaiting, decision="approval_refused")
    assert refusal.details["reason"].startswith("four eyes")
    # A responder is another person: the promotion goes through.
    assert (
        'id="approve"'
        in personas["responder"].get(reverse("rollout_detail", args=[awaiting.pk])).content.decode()
    )
    personas["responder"].post(reverse("rollout_approve", args=[awaiting.pk]))
    awaiting.refresh_from_db()
    assert awaiting.state == Rollout.State.RUNNING


def test_the_four_eyes_box_reaches_the_rollout(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    personas["operator"].post(
        reverse("rollout_new"), _form(release, cluster=cluster_b.pk, start="1", four_eyes="on")
    )
    assert Rollout.objects.get().opts.four_eyes is True

"""The API, persona by persona: what each may see and do is what the pages allow; status
codes, JSON errors and the database afterwards."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.api.conftest import MakeToken
from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import Cluster, Event, Release, Rollout, StageDecision, UpdateJob

pytestmark = pytest.mark.django_db

Api = dict[str, APIClient]


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


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["message"]
    return body


def _node_ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.content
    return {n["node_id"] for n in response.json()["results"]}


@pytest.mark.parametrize(
    ("persona", "visible"),
    [
        ("operator", {"a-1", "a-solo", "b-1"}),
        ("responder", {"a-1", "a-solo", "b-1"}),
        ("admin_a", {"a-1", "a-solo"}),
        ("admin_b", {"b-1"}),
    ],
)
def test_node_list_is_scoped_like_the_fleet_page(api: Api, persona: str, visible: set[str]) -> None:
    assert _node_ids(api[persona].get("/api/v1/nodes/")) == visible


def test_node_filters(api: Api, fleet: Fleet) -> None:
    client = api["operator"]
    assert _node_ids(client.get("/api/v1/nodes/", {"tenant": "tenant-a"})) == {"a-1", "a-solo"}
    assert _node_ids(client.get("/api/v1/nodes/", {"cluster": "a-main"})) == {"a-1"}
    assert _node_ids(client.get("/api/v1/nodes/", {"cluster": str(fleet.cluster_a.pk)})) == {"a-1"}
    assert _node_ids(client.get("/api/v1/nodes/", {"search": "solo"})) == {"a-solo"}
    fleet.node_b.installed_version = "9.9.9"
    fleet.node_b.status = "failed"
    fleet.node_b.save()
    assert _node_ids(client.get("/api/v1/nodes/", {"version": "9.9.9"})) == {"b-1"}
    assert _node_ids(client.get("/api/v1/nodes/", {"status": "failed"})) == {"b-1"}
    body = _error(client.get("/api/v1/nodes/", {"status": "sleepy"}), 400, "invalid")
    assert "status" in body["fields"]
    # A tenant admin naming another tenant gets nothing, not an error that confirms it exists.
    assert _node_ids(api["admin_a"].get("/api/v1/nodes/", {"tenant": "tenant-b"})) == set()


def test_another_tenants_node_is_a_404(api: Api) -> None:
    assert api["admin_a"].get("/api/v1/nodes/a-1/").status_code == 200
    _error(api["admin_a"].get("/api/v1/nodes/b-1/"), 404, "not_found")
    _error(api["admin_b"].get("/api/v1/nodes/a-1/"), 404, "not_found")


def test_node_detail_never_shows_the_agent_key(api: Api, fleet: Fleet) -> None:
    body = api["operator"].get("/api/v1/nodes/a-1/").json()
    assert body["node_id"] == "a-1" and body["tenant"] == "tenant-a"
    assert fleet.node_a.agent_key not in str(body)
    assert "agent_key" not in body


def test_anonymous_gets_401_json(api: Api) -> None:
    response = api["anonymous"].get("/api/v1/nodes/")
    _error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_expired_revoked_and_unknown_tokens_get_401(make_token: MakeToken) -> None:
    from django.utils import timezone

    from updates.api import services
    from updates.api.models import ApiToken

    expired = make_token("operator", name="expired")
    ApiToken.objects.filter(pk=expired.token.pk).update(expires_at=timezone.now())
    _error(expired.client.get("/api/v1/nodes/"), 401, "token_expired")

    revoked = make_token("operator", name="revoked")
    assert services.token_revoke(token=revoked.token, user=revoked.user)
    _error(revoked.client.get("/api/v1/nodes/"), 401, "token_revoked")

    for header in ("Bearer thm_not-a-token", "Bearer nope", "Bearer a b", "Bearer"):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=header)
        _error(client.get("/api/v1/nodes/"), 401, "token_invalid")


def test_a_deactivated_users_token_gets_401(make_token: MakeToken) -> None:
    persona = make_token("operator")
    persona.user.is_active = False
    persona.user.save()
    _error(persona.client.get("/api/v1/nodes/"), 401, "token_invalid")


def test_only_the_digest_is_stored_and_last_use_is_recorded(make_token: MakeToken) -> None:
    import hashlib

    persona = make_token("operator")
    assert persona.token.secret_sha256 == hashlib.sha256(persona.secret.encode()).hexdigest()
    assert persona.secret not in str(vars(persona.token))
    assert persona.token.last_used_at is None
    assert persona.client.get("/api/v1/token/").json()["name"] == persona.token.name
    persona.token.refresh_from_db()
    assert persona.token.last_used_at is not None


def test_read_scope_cannot_write(make_token: MakeToken, release: Release) -> None:
    reader = make_token("operator", scopes=["read"])
    assert reader.client.get("/api/v1/releases/").status_code == 200
    _error(reader.client.post(f"/api/v1/releases/{release.pk}/deprecate/"), 403, "scope_missing")
    _error(
        reader.client.post("/api/v1/nodes/a-1/update/", {"release": release.pk}),
        403,
        "scope_missing",
    )
    release.refresh_from_db()
    assert release.state == Release.State.PUBLISHED
    assert not UpdateJob.objects.exists()


def test_deploy_scope_without_read_cannot_list(make_token: MakeToken) -> None:
    deployer = make_token("operator", scopes=["deploy"])
    _error(deployer.client.get("/api/v1/nodes/"), 403, "scope_missing")


def test_a_token_never_exceeds_its_users_role(api: Api, release: Release) -> None:
    # Tenant admins may not start updates on the pages; a token of every scope changes nothing.
    _error(
        api["admin_a"].post("/api/v1/nodes/a-1/update/", {"release": release.pk}),
        403,
        "permission_denied",
    )
    _error(
        api["responder"].post(f"/api/v1/releases/{release.pk}/deprecate/"), 403, "permission_denied"
    )
    assert not UpdateJob.objects.exists()


def test_operator_updates_a_node_and_the_audit_log_names_the_token(
    make_token: MakeToken, release: Release, fleet: Fleet
) -> None:
    persona = make_token("operator", name="ci-pipeline")
    response = persona.client.post(
        "/api/v1/nodes/a-1/update/", {"release": release.pk}, format="json"
    )
    assert response.status_code == 201, response.content
    job = UpdateJob.objects.get()
    assert response.json()["id"] == job.pk and job.node == fleet.node_a
    event = Event.objects.get(verb="api.node.update")
    assert event.details["token"] == "ci-pipeline"
    assert event.actor == persona.user and event.tenant_id == fleet.tenant_a.pk
    assert "ci-pipeline" in event.actor_label


def test_node_update_validation_names_the_field(api: Api) -> None:
    body = _error(
        api["operator"].post("/api/v1/nodes/a-1/update/", {}, format="json"), 400, "invalid"
    )
    assert "release" in body["fields"]
    _error(
        api["operator"].post("/api/v1/nodes/a-1/update/", {"release": 999}, format="json"),
        404,
        "not_found",
    )
    _error(
        api["operator"].post("/api/v1/nodes/a-1/update/", "{", content_type="application/json"),
        400,
        "parse_error",
    )


def test_node_update_is_idempotent(api: Api, release: Release) -> None:
    headers = {"Idempotency-Key": "deploy-42"}
    first = api["operator"].post(
        "/api/v1/nodes/a-1/update/", {"release": release.pk}, format="json", headers=headers
    )
    again = api["operator"].post(
        "/api/v1/nodes/a-1/update/", {"release": release.pk}, format="json", headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again["Idempotent-Replayed"] == "true"
    assert UpdateJob.objects.count() == 1


def test_rollback_needs_a_known_restore_point(api: Api, fleet: Fleet) -> None:
    body = _error(
        api["operator"].post("/api/v1/nodes/a-1/rollback/", {"point": "p9"}, format="json"),
        404,
        "not_found",
    )
    assert "point" in body["fields"]
    fleet.node_a.restore_points = [{"id": "p1", "version": "1.6.0"}]
    fleet.node_a.save()
    response = api["operator"].post("/api/v1/nodes/a-1/rollback/", {"point": "p1"}, format="json")
    assert response.status_code == 201, response.content
    assert UpdateJob.objects.get().kind == UpdateJob.Kind.ROLLBACK


def test_end_and_cancel_jobs(api: Api, release: Release) -> None:
    job = (
        api["operator"]
        .post("/api/v1/nodes/a-1/update/", {"release": release.pk}, format="json")
        .json()
    )
    _error(
        api["admin_b"].post(f"/api/v1/nodes/a-1/jobs/{job['id']}/cancel/"), 403, "permission_denied"
    )
    response = api["operator"].post(f"/api/v1/nodes/a-1/jobs/{job['id']}/cancel/")
    assert response.status_code == 200, response.content
    assert response.json()["state"] in {"CANCELLED", "CANCELLING"}
    _error(api["operator"].post(f"/api/v1/nodes/a-1/jobs/{job['id']}/cancel/"), 409, "job_started")
    # the job belongs to a-1: through another node it does not exist
    _error(api["operator"].post(f"/api/v1/nodes/a-solo/jobs/{job['id']}/end/"), 404, "not_found")

    other = (
        api["operator"]
        .post("/api/v1/nodes/a-solo/update/", {"release": release.pk}, format="json")
        .json()
    )
    response = api["operator"].post(
        f"/api/v1/nodes/a-solo/jobs/{other['id']}/end/", {"reason": "agent gone"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert UpdateJob.objects.get(pk=other["id"]).state == UpdateJob.State.LOST
    _error(
        api["operator"].post(f"/api/v1/nodes/a-solo/jobs/{other['id']}/end/"), 409, "job_finished"
    )


# ------------------------------------------------------------------ releases


def test_release_upload_is_verified_like_the_form(api: Api, trusted: Any, make_bundle: Any) -> None:
    bundle = make_bundle("1.8.0")
    with open(bundle, "rb") as fh:
        response = api["operator"].post("/api/v1/releases/", {"bundle": fh, "channel": "beta"})
    assert response.status_code == 201, response.content
    release = Release.objects.get(version="1.8.0")
    assert response.json()["id"] == release.pk and release.channel == "beta"
    assert Event.objects.filter(verb="release.published").exists()
    assert Event.objects.get(verb="api.release.upload").details["status"] == 201

    with open(bundle, "rb") as fh:
        again = api["operator"].post("/api/v1/releases/", {"bundle": fh})
    _error(again, 409, "release_rejected")


def test_a_tampered_bundle_is_rejected_and_nothing_stored(
    api: Api, trusted: Any, tmp_path: Any
) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 10)
    with open(junk, "rb") as fh:
        body = _error(
            api["operator"].post("/api/v1/releases/", {"bundle": fh}), 400, "release_rejected"
        )
    assert "bundle" in body["fields"]
    assert not Release.objects.exists()
    body = _error(api["operator"].post("/api/v1/releases/", {"channel": "stable"}), 400, "invalid")
    assert "bundle" in body["fields"]


def test_upload_needs_the_publish_permission(api: Api, make_bundle: Any, trusted: Any) -> None:
    with open(make_bundle("1.8.0"), "rb") as fh:
        _error(api["responder"].post("/api/v1/releases/", {"bundle": fh}), 403, "permission_denied")
    assert not Release.objects.exists()


def test_deprecate_and_delete(api: Api, release: Release) -> None:
    response = api["operator"].post(f"/api/v1/releases/{release.pk}/deprecate/")
    assert response.status_code == 200 and response.json()["state"] == "deprecated"
    response = api["operator"].delete(f"/api/v1/releases/{release.pk}/")
    assert response.status_code == 204
    assert not Release.objects.exists()
    _error(api["operator"].delete(f"/api/v1/releases/{release.pk}/"), 404, "not_found")


def test_a_release_in_use_is_not_deleted(api: Api, release: Release) -> None:
    api["operator"].post("/api/v1/nodes/a-1/update/", {"release": release.pk}, format="json")
    _error(api["operator"].delete(f"/api/v1/releases/{release.pk}/"), 409, "release_in_use")
    assert Release.objects.filter(pk=release.pk).exists()


# ------------------------------------------------------------------ rollouts


def _rollout(release: Release, cluster: Cluster, **extra: Any) -> dict[str, Any]:
    return {"release": release.pk, "strategy": "canary", "cluster": cluster.pk, **extra}


def test_preview_saves_nothing(api: Api, release: Release, cluster_b: Cluster) -> None:
    response = api["operator"].post(
        "/api/v1/rollouts/preview/", _rollout(release, cluster_b, stages=[34, 100]), format="json"
    )
    assert response.status_code == 200, response.content
    plan = response.json()
    assert len(plan["stage_sizes"]) == 2 and sum(plan["stage_sizes"]) == 3
    assert plan["nodes"][-1]["node"] == "bm-2" and plan["nodes"][-1]["is_leader"]
    assert not Rollout.objects.exists()


def test_create_starts_the_rollout_and_status_shows_each_node(
    api: Api, release: Release, cluster_b: Cluster
) -> None:
    response = api["operator"].post(
        "/api/v1/rollouts/", _rollout(release, cluster_b), format="json"
    )
    assert response.status_code == 201, response.content
    rollout = Rollout.objects.get()
    assert response.json()["id"] == rollout.pk and rollout.state == Rollout.State.RUNNING
    status = api["responder"].get(f"/api/v1/rollouts/{rollout.pk}/").json()
    assert status["progress"]["nodes_total"] == 3
    assert [n["node"] for n in status["nodes"]] == ["bm-0", "bm-1", "bm-2"]
    # Tenant A's admin: not a rollout of theirs.
    _error(api["admin_a"].get(f"/api/v1/rollouts/{rollout.pk}/"), 404, "not_found")
    assert api["admin_b"].get(f"/api/v1/rollouts/{rollout.pk}/").status_code == 200


def test_create_validation_names_the_fields(api: Api, release: Release, cluster_b: Cluster) -> None:
    body = _error(
        api["operator"].post(
            "/api/v1/rollouts/",
            _rollout(release, cluster_b, stages=[50, 10], version_filter="~~"),
            format="json",
        ),
        400,
        "invalid",
    )
    assert {"stages", "version_filter"} <= set(body["fields"])
    body = _error(api["operator"].post("/api/v1/rollouts/", {}, format="json"), 400, "invalid")
    assert "release" in body["fields"]
    body = _error(
        api["operator"].post(
            "/api/v1/rollouts/", _rollout(release, cluster_b, strategy="yolo"), format="json"
        ),
        400,
        "invalid",
    )
    assert "strategy" in body["fields"]
    # Tenant A's admin cannot even name tenant B's cluster (and may not start rollouts).
    _error(
        api["admin_a"].post("/api/v1/rollouts/", _rollout(release, cluster_b), format="json"),
        403,
        "permission_denied",
    )
    assert not Rollout.objects.exists()


def test_create_is_idempotent(api: Api, release: Release, cluster_b: Cluster) -> None:
    data = _rollout(release, cluster_b)
    headers = {"Idempotency-Key": "pipeline-run-7"}
    first = api["operator"].post("/api/v1/rollouts/", data, format="json", headers=headers)
    again = api["operator"].post("/api/v1/rollouts/", data, format="json", headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert Rollout.objects.count() == 1
    assert StageDecision.objects.filter(decision="started").count() == 1
    # The same key with another request is refused; another user's key is their own.
    other = api["operator"].post(
        "/api/v1/rollouts/", {**data, "stages": [50, 100]}, format="json", headers=headers
    )
    _error(other, 422, "idempotency_key_reused")
    _error(
        api["operator"].post(
            "/api/v1/rollouts/", data, format="json", headers={"Idempotency-Key": ""}
        ),
        400,
        "idempotency_key_invalid",
    )
    assert Rollout.objects.count() == 1


def test_create_without_start_then_start(api: Api, release: Release, cluster_b: Cluster) -> None:
    created = (
        api["operator"]
        .post("/api/v1/rollouts/", _rollout(release, cluster_b, start=False), format="json")
        .json()
    )
    assert created["state"] == "PLANNED"
    response = api["operator"].post(f"/api/v1/rollouts/{created['id']}/start/")
    assert response.status_code == 200, response.content
    assert response.json()["rollout"]["state"] == "RUNNING"
    _error(api["operator"].post(f"/api/v1/rollouts/{created['id']}/start/"), 409, "rollout_state")


@pytest.fixture
def awaiting(release: Release, cluster_b: Cluster) -> Rollout:
    from django.utils import timezone

    from updates.models import Node
    from updates.rollouts import coordinator
    from updates.rollouts import services as rollouts

    nodes = list(cluster_b.nodes.all())
    rollout = rollouts.rollout_create(release=release, strategy="canary", nodes=nodes, user=None)
    rollouts.rollout_start(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    jobs.job_finish(
        job_id=job.pk, node_id=job.node.node_id, ok=True, result={"version_to": "1.7.0"}
    )
    Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.AWAITING_APPROVAL
    return rollout


@pytest.mark.parametrize(
    ("persona", "scopes", "status", "code"),
    [
        ("responder", ["read", "approve"], 200, ""),
        ("operator", ["approve"], 200, ""),
        ("responder", ["read", "deploy"], 403, "scope_missing"),
        ("admin_b", ["approve"], 403, "permission_denied"),
    ],
)
def test_approval(
    make_token: MakeToken,
    awaiting: Rollout,
    persona: str,
    scopes: list[str],
    status: int,
    code: str,
) -> None:
    client = make_token(persona, scopes=scopes).client
    response = client.post(f"/api/v1/rollouts/{awaiting.pk}/approve/")
    assert response.status_code == status, response.content
    if code:
        assert response.json()["code"] == code
    awaiting.refresh_from_db()
    approved = status == 200
    assert (awaiting.state == Rollout.State.RUNNING) is approved
    assert StageDecision.objects.filter(rollout=awaiting, decision="approved").exists() is approved


def test_pause_resume_abort(make_token: MakeToken, awaiting: Rollout) -> None:
    client = make_token("responder", scopes=["read", "deploy"]).client
    for action, state in [("pause", "PAUSED"), ("resume", "RUNNING"), ("abort", "ABORTING")]:
        response = client.post(f"/api/v1/rollouts/{awaiting.pk}/{action}/")
        assert response.status_code == 200, response.content
        assert response.json()["rollout"]["state"] == state
    _error(client.post(f"/api/v1/rollouts/{awaiting.pk}/resume/"), 409, "rollout_state")


def test_cancel_needs_the_operator_role(api: Api, awaiting: Rollout) -> None:
    _error(
        api["responder"].post(f"/api/v1/rollouts/{awaiting.pk}/cancel/"), 403, "permission_denied"
    )
    response = api["operator"].post(f"/api/v1/rollouts/{awaiting.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["rollout"]["state"] == "CANCELLING"


def test_rollout_list_is_scoped(api: Api, awaiting: Rollout) -> None:
    def ids(persona: str) -> set[int]:
        return {r["id"] for r in api[persona].get("/api/v1/rollouts/").json()["results"]}

    assert ids("operator") == ids("admin_b") == {awaiting.pk}
    assert ids("admin_a") == set()


# ------------------------------------------------------------------ events, errors, throttling


def test_events_cursor_pagination_and_filters(api: Api, fleet: Fleet) -> None:
    from updates.audit import event_log

    for i in range(130):
        event_log(verb=f"test.{i % 2}", tenant=fleet.tenant_a if i % 3 else fleet.tenant_b)
    client = api["operator"]
    first = client.get("/api/v1/events/", {"page_size": 100}).json()
    assert len(first["results"]) == 100 and first["next"]
    rest = client.get(first["next"]).json()
    seen = [e["id"] for e in first["results"] + rest["results"]]
    assert len(seen) == len(set(seen)) == Event.objects.count()
    assert seen == sorted(seen, reverse=True)
    only = client.get("/api/v1/events/", {"verb": "test.1", "page_size": "1000"}).json()["results"]
    assert only and all(e["verb"] == "test.1" for e in only)
    # Tenant A's admin sees tenant A's events only, and cannot filter on tenant B.
    mine = api["admin_a"].get("/api/v1/events/", {"page_size": 1000}).json()["results"]
    assert mine and {e["tenant"] for e in mine} == {"tenant-a"}
    body = _error(
        api["admin_a"].get("/api/v1/events/", {"tenant": fleet.tenant_b.pk}), 400, "invalid"
    )
    assert "tenant" in body["fields"]
    body = _error(client.get("/api/v1/events/", {"since": "yesterday"}), 400, "invalid")
    assert "since" in body["fields"]


def test_unknown_paths_and_methods_answer_json(api: Api) -> None:
    _error(api["operator"].get("/api/v1/nope/"), 404, "not_found")
    _error(api["anonymous"].get("/api/v1/nodes/a-1/extra/"), 404, "not_found")
    _error(api["operator"].put("/api/v1/nodes/"), 405, "method_not_allowed")


def test_throttled_per_token(make_token: MakeToken, settings: Any) -> None:
    settings.THEMIS_API_RATE = "3/min"
    first, second = make_token("operator", name="one"), make_token("operator", name="two")
    for _ in range(3):
        assert first.client.get("/api/v1/nodes/").status_code == 200
    _error(first.client.get("/api/v1/nodes/"), 429, "throttled")
    # Another token of the same user has its own budget.
    assert second.client.get("/api/v1/nodes/").status_code == 200


def test_schema_and_docs_are_served(api: Api) -> None:
    schema = api["anonymous"].get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert "/api/v1/rollouts/{rollout_id}/approve/" in schema.json()["paths"]
    docs = api["anonymous"].get("/api/v1/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    # The Content-Security-Policy allows no inline script or style.
    assert "<script>" not in html and "<style>" not in html


# ------------------------------------------------------------------ tenants


def test_tenants_are_scoped_like_the_tenant_pages(api: Api) -> None:
    def slugs(persona: str) -> set[str]:
        return {t["slug"] for t in api[persona].get("/api/v1/tenants/").json()}

    assert slugs("operator") == slugs("responder") == {"tenant-a", "tenant-b"}
    assert slugs("admin_a") == {"tenant-a"}
    detail = api["admin_a"].get("/api/v1/tenants/tenant-a/").json()
    assert detail["can_edit"] is True and detail["policy"]["consent_valid_days"] >= 1
    assert api["responder"].get("/api/v1/tenants/tenant-a/").json()["can_edit"] is False
    _error(api["admin_a"].get("/api/v1/tenants/tenant-b/"), 404, "not_found")


def test_consent_decisions(api: Api, make_token: MakeToken, release: Release) -> None:
    from tenants.models import Consent

    url = "/api/v1/tenants/tenant-a/consent/"
    grant = {"release": release.pk, "decision": "grant", "valid_days": 7}
    # Only who may edit the tenant, with a token of the admin scope.
    _error(api["admin_b"].post(url, grant, format="json"), 404, "not_found")
    _error(api["responder"].post(url, grant, format="json"), 403, "permission_denied")
    reader = make_token("admin_a", scopes=["read"], name="reader").client
    _error(reader.post(url, grant, format="json"), 403, "scope_missing")
    body = _error(
        api["admin_a"].post(url, {"release": release.pk, "decision": "decline"}, format="json"),
        400,
        "invalid",
    )
    assert "reason" in body["fields"]
    assert not Consent.objects.exists()

    response = api["admin_a"].post(url, grant, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["decision"] == "granted"
    consent = Consent.objects.get()
    assert consent.decided_by is not None and consent.decided_by.username == "alice"
    assert Event.objects.filter(verb="api.tenant.consent", details__status=200).count() == 1


def test_tenant_detail_lists_the_releases_waiting_for_consent(
    api: Api, fleet: Fleet, release: Release
) -> None:
    waiting = UpdateJob.State.WAITING_FOR_CONSENT
    UpdateJob.objects.create(node=fleet.node_a, release=release, state=waiting)
    UpdateJob.objects.create(node=fleet.node_a_standalone, release=release, state=waiting)
    UpdateJob.objects.create(node=fleet.node_b, release=release, state=waiting)
    pending = api["admin_a"].get("/api/v1/tenants/tenant-a/").json()["pending_consents"]
    assert len(pending) == 1
    assert pending[0]["release"] == "1.7.0" and pending[0]["release_id"] == release.pk
    assert sorted(pending[0]["nodes"]) == ["a-1", "a-solo"] and pending[0]["consent"] is None
    # A decline is shown with the release still waiting (its jobs were cancelled: none left).
    api["admin_a"].post(
        "/api/v1/tenants/tenant-a/consent/",
        {"release": release.pk, "decision": "decline", "reason": "not before the audit"},
        format="json",
    )
    assert api["admin_a"].get("/api/v1/tenants/tenant-a/").json()["pending_consents"] == []
    on_b = api["operator"].get("/api/v1/tenants/tenant-b/").json()["pending_consents"]
    assert [p["nodes"] for p in on_b] == [["b-1"]]


# ------------------------------------------------------------------ notification channels


def test_channels_are_scoped_and_never_show_secrets(api: Api, fleet: Fleet) -> None:
    from updates.notifications.models import Channel

    secret = "very-secret-webhook-key-0123456789"
    fleet_wide = Channel.objects.create(
        name="ops", type="webhook", secrets=secret, secret_hints={"url": "…6789"}
    )
    mine = Channel.objects.create(
        name="tenant a", type="webhook", tenant=fleet.tenant_a, secrets=secret
    )

    def ids(persona: str) -> set[int]:
        response = api[persona].get("/api/v1/channels/")
        assert secret not in response.content.decode()
        return {c["id"] for c in response.json()}

    assert ids("operator") == ids("responder") == {fleet_wide.pk, mine.pk}
    assert ids("admin_a") == {mine.pk}
    assert ids("admin_b") == set()
    detail = api["operator"].get(f"/api/v1/channels/{fleet_wide.pk}/")
    assert detail.json()["secret_hints"] == {"url": "…6789"} and "secrets" not in detail.json()
    assert secret not in detail.content.decode()
    _error(api["admin_a"].get(f"/api/v1/channels/{fleet_wide.pk}/"), 404, "not_found")


def test_an_idempotency_key_is_kept_for_a_day(api: Api, release: Release) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from updates.api.models import IdempotencyRecord

    headers = {"Idempotency-Key": "nightly"}
    data = {"release": release.pk}
    api["operator"].post("/api/v1/nodes/a-1/update/", data, format="json", headers=headers)
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))
    # A day later the key is new again: this update is another one, and the old record went.
    UpdateJob.objects.update(state=UpdateJob.State.DONE)
    again = api["operator"].post("/api/v1/nodes/a-1/update/", data, format="json", headers=headers)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    assert UpdateJob.objects.count() == 2
    assert IdempotencyRecord.objects.count() == 1


def test_policy_windows_and_blackouts(api: Api, fleet: Fleet, make_token: MakeToken) -> None:
    from tenants.models import Blackout, MaintenanceWindow, UpdatePolicy

    base = "/api/v1/tenants/tenant-a"
    client = api["admin_a"]
    response = client.put(f"{base}/policy/", {"requires_consent": True}, format="json")
    assert response.status_code == 200, response.content
    policy = UpdatePolicy.objects.get(tenant=fleet.tenant_a)
    assert policy.requires_consent and policy.auto_update  # the rest kept its value
    body = _error(
        client.put(f"{base}/policy/", {"consent_valid_days": 0}, format="json"), 400, "invalid"
    )
    assert "consent_valid_days" in body["fields"]
    _error(api["responder"].put(f"{base}/policy/", {}, format="json"), 403, "permission_denied")
    _error(api["admin_b"].put(f"{base}/policy/", {}, format="json"), 404, "not_found")

    window = {
        "days": [5, 6],
        "start_time": "02:00",
        "end_time": "04:00",
        "timezone": "Europe/Berlin",
    }
    response = client.post(f"{base}/windows/", window, format="json")
    assert response.status_code == 201, response.content
    window_id = response.json()["id"]
    assert MaintenanceWindow.objects.get(pk=window_id).days == "56"
    _error(client.post(f"{base}/windows/", window, format="json"), 400, "invalid")  # overlaps
    body = _error(
        client.post(f"{base}/windows/", {**window, "timezone": "Mars/Base"}, format="json"),
        400,
        "invalid",
    )
    assert "timezone" in body["fields"]
    _error(api["admin_b"].delete(f"{base}/windows/{window_id}/"), 404, "not_found")
    assert client.delete(f"{base}/windows/{window_id}/").status_code == 204
    assert not MaintenanceWindow.objects.exists()

    blackout = {
        "name": "year end",
        "starts_local": "2099-12-24T00:00",
        "ends_local": "2099-12-27T00:00",
        "timezone": "UTC",
    }
    response = client.post(f"{base}/blackouts/", blackout, format="json")
    assert response.status_code == 201, response.content
    blackout_id = response.json()["id"]
    body = _error(
        client.post(f"{base}/blackouts/", {**blackout, "ends_local": "soon"}, format="json"),
        400,
        "invalid",
    )
    assert "ends_local" in body["fields"]
    # Not through another tenant's URL, even for an operator.
    _error(
        api["operator"].delete(f"/api/v1/tenants/tenant-b/blackouts/{blackout_id}/"),
        404,
        "not_found",
    )
    assert client.delete(f"{base}/blackouts/{blackout_id}/").status_code == 204
    assert not Blackout.objects.exists()
    actions = set(
        Event.objects.filter(verb__startswith="api.tenant.").values_list("verb", flat=True)
    )
    assert {
        "api.tenant.policy",
        "api.tenant.window_create",
        "api.tenant.blackout_delete",
    } <= actions


def test_a_request_django_refuses_is_json_under_the_api(api: Api) -> None:
    response = api["operator"].get("/api/v1/nodes/", HTTP_HOST="evil.example")
    _error(response, 400, "bad_request")
    page = api["operator"].get("/login/", HTTP_HOST="evil.example")
    assert page.status_code == 400 and not page["Content-Type"].startswith("application/json")


def test_list_parameters_are_checked(api: Api) -> None:
    for path, param in [
        ("/api/v1/releases/", {"state": "shiny"}),
        ("/api/v1/rollouts/", {"state": "done-ish"}),
        ("/api/v1/nodes/", {"page_size": "0"}),
        ("/api/v1/events/", {"page_size": "lots"}),
    ]:
        body = _error(api["operator"].get(path, param), 400, "invalid")
        assert set(param) <= set(body["fields"])


# ------------------------------------------------------------------ notification channels: writes

SLACK_URL = "https://hooks.slack.com/services/T0001/B0001/slackTokenXyzzy0123456789"
HOOK_URL = "https://hooks.example.com/themis/hookTokenPlugh9876543210"
SIGNING = "signing-secret-Frobozz-0123456789"
SECRETS = (SLACK_URL, HOOK_URL, SIGNING, "slackTokenXyzzy", "hookTokenPlugh", "Frobozz")


def _no_secret(response: Any) -> None:
    """No answer holds a channel secret, nor any recognisable part of one."""
    text = response.content.decode()
    for secret in SECRETS:
        assert secret not in text, (secret, text)
    if response.status_code < 300 and isinstance(response.json(), dict):
        for name in ("url", "routing_key", "signing_secret", "secrets"):
            assert name not in response.json()


def _slack(tenant: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": "deploys",
        "type": "slack",
        "tenant": tenant,
        "kinds": ["rollout_failed", "completed"],
        "url": SLACK_URL,
        **extra,
    }


@pytest.fixture
def channels(fleet: Fleet) -> dict[str, Any]:
    from updates.notifications import services as notify

    def make(name: str, tenant: Any) -> Any:
        return notify.channel_create(
            name=name,
            channel_type="webhook",
            tenant=tenant,
            kinds=["rollout_failed"],
            secrets={"url": HOOK_URL, "signing_secret": SIGNING},
            user=None,
        )

    return {"fleet": make("ops", None), "a": make("a hook", fleet.tenant_a)}


@pytest.mark.parametrize(
    ("persona", "tenant", "status", "code", "field"),
    [
        ("operator", None, 201, "", ""),
        ("operator", "tenant-b", 201, "", ""),
        ("admin_a", "tenant-a", 201, "", ""),
        # As on the page: another tenant is no choice, and only operators go fleet-wide.
        ("admin_a", "tenant-b", 400, "invalid", "tenant"),
        ("admin_a", "no-such-tenant", 400, "invalid", "tenant"),
        ("admin_a", None, 400, "invalid", "tenant"),
        ("responder", None, 403, "permission_denied", ""),
        ("anonymous", None, 401, "not_authenticated", ""),
    ],
)
def test_channel_create_per_persona(
    api: Api, persona: str, tenant: str | None, status: int, code: str, field: str
) -> None:
    from updates.notifications.models import Channel

    response = api[persona].post("/api/v1/channels/", _slack(tenant), format="json")
    _no_secret(response)
    if code:
        body = _error(response, status, code)
        if field:
            assert field in body["fields"], body
        assert not Channel.objects.exists()
        return
    assert response.status_code == status, response.content
    channel = Channel.objects.get()
    body = response.json()
    assert body["id"] == channel.pk and body["tenant"] == tenant
    assert body["secret_hints"] == {"url": "https://hooks.slack.com/…6789"}
    assert channel.kinds == ["completed", "rollout_failed"]
    # Encrypted at rest, as the page stores it.
    assert SLACK_URL not in channel.secrets
    assert Event.objects.filter(verb="notification.channel_created").exists()


def test_channel_create_needs_the_admin_scope(make_token: MakeToken) -> None:
    from updates.notifications.models import Channel

    for scopes in (["read"], ["read", "deploy", "approve"]):
        client = make_token("operator", scopes=scopes, name="-".join(scopes)).client
        _error(client.post("/api/v1/channels/", _slack(), format="json"), 403, "scope_missing")
    assert not Channel.objects.exists()


def test_channel_validation_names_the_field_and_repeats_no_secret(api: Api) -> None:
    from updates.notifications.models import Channel

    client = api["operator"]
    cases: list[tuple[dict[str, Any], str]] = [
        (_slack(url=SLACK_URL.replace("https", "http")), "url"),  # the page wants https
        (_slack(url="https://127.0.0.1/hookTokenPlugh9876543210"), "url"),  # no private host
        # A URL Python cannot parse: its error message would quote the user and password.
        (_slack(url="https://ops:hookTokenPlugh9876543210\uff03@hooks.example.com/x"), "url"),
        (_slack(url=""), "url"),  # a Slack channel needs its URL
        (_slack(type="pagerduty", url="", routing_key="not a key, Frobozz"), "routing_key"),
        (_slack(type="webhook", signing_secret="short"), "signing_secret"),
        (_slack(type="carrier-pigeon"), "type"),
        (_slack(kinds=[]), "kinds"),
        (_slack(kinds=["rollout_failed", "weather"]), "kinds"),
        (_slack(name=""), "name"),
        (_slack(type="pagerduty", url="", routing_key="a" * 32, kinds=["paused"]), "kinds"),
    ]
    for data, field in cases:
        response = client.post("/api/v1/channels/", data, format="json")
        _no_secret(response)
        body = _error(response, 400, "invalid")
        assert field in body["fields"], (data, body)
    assert not Channel.objects.exists()


def test_channel_create_is_idempotent(make_token: MakeToken) -> None:
    from updates.api.models import IdempotencyRecord
    from updates.notifications.models import Channel

    persona = make_token("operator", name="chatops")
    headers = {"Idempotency-Key": "channel-1"}
    data = _slack(type="webhook", url=HOOK_URL, signing_secret=SIGNING)
    first = persona.client.post("/api/v1/channels/", data, format="json", headers=headers)
    again = persona.client.post("/api/v1/channels/", data, format="json", headers=headers)
    assert first.status_code == again.status_code == 201, first.content
    assert first.json() == again.json() and again["Idempotent-Replayed"] == "true"
    _no_secret(first)
    _no_secret(again)
    assert Channel.objects.count() == 1
    # The stored answer holds no secret either.
    assert not any(s in str(r.response) for r in IdempotencyRecord.objects.all() for s in SECRETS)
    other = persona.client.post(
        "/api/v1/channels/", {**data, "name": "other"}, format="json", headers=headers
    )
    _error(other, 422, "idempotency_key_reused")
    _no_secret(other)
    assert Channel.objects.count() == 1
    events = Event.objects.filter(verb="api.channel.create")
    assert events.count() == 3
    assert {e.details["token"] for e in events} == {"chatops"}
    assert [e.details.get("replayed", False) for e in events.order_by("id")] == [
        False,
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("persona", "which", "status", "code"),
    [
        ("operator", "fleet", 200, ""),
        ("operator", "a", 200, ""),
        ("admin_a", "a", 200, ""),
        # Not visible to a tenant admin: the page's 404, not a 403 that confirms it exists.
        ("admin_a", "fleet", 404, "not_found"),
        ("admin_b", "a", 404, "not_found"),
        # Visible, read-only: the page's 403.
        ("responder", "a", 403, "permission_denied"),
    ],
)
def test_channel_update_per_persona(
    api: Api, channels: dict[str, Any], persona: str, which: str, status: int, code: str
) -> None:
    from updates.notifications.crypto import decrypt_secrets

    channel = channels[which]
    response = api[persona].patch(
        f"/api/v1/channels/{channel.pk}/",
        {"name": "renamed", "enabled": False},
        format="json",
    )
    _no_secret(response)
    channel.refresh_from_db()
    if code:
        _error(response, status, code)
        assert channel.name != "renamed" and channel.enabled
        return
    assert response.status_code == status, response.content
    assert response.json()["name"] == "renamed" and response.json()["enabled"] is False
    assert channel.name == "renamed" and not channel.enabled
    assert channel.kinds == ["rollout_failed"]  # left out: kept
    # Secrets left out are kept, as on the edit page.
    assert decrypt_secrets(channel.secrets) == {"url": HOOK_URL, "signing_secret": SIGNING}


def test_channel_update_changes_a_secret_and_keeps_type_and_tenant(
    make_token: MakeToken, channels: dict[str, Any], fleet: Fleet
) -> None:
    from updates.notifications.crypto import decrypt_secrets

    persona = make_token("admin_a", name="tenant-a-bot")
    channel = channels["a"]
    url = f"/api/v1/channels/{channel.pk}/"
    new_url = "https://hooks.example.com/themis/rotatedSecretWibble1234"
    response = persona.client.patch(url, {"url": new_url, "tenant": "tenant-a"}, format="json")
    assert response.status_code == 200, response.content
    assert new_url not in response.content.decode() and "Wibble" not in response.content.decode()
    assert response.json()["secret_hints"]["url"] == "https://hooks.example.com/…1234"
    channel.refresh_from_db()
    assert decrypt_secrets(channel.secrets) == {"url": new_url, "signing_secret": SIGNING}
    for data, field in [
        ({"type": "slack"}, "type"),
        ({"tenant": "tenant-b"}, "tenant"),
        ({"tenant": None}, "tenant"),
        ({"kinds": []}, "kinds"),
        ({"url": "http://hooks.example.com/hookTokenPlugh"}, "url"),
        ({"signing_secret": "short"}, "signing_secret"),
    ]:
        body = _error(persona.client.patch(url, data, format="json"), 400, "invalid")
        assert field in body["fields"], (data, body)
    channel.refresh_from_db()
    assert channel.type == "webhook" and channel.tenant == fleet.tenant_a
    event = Event.objects.filter(verb="api.channel.update").order_by("id").first()
    assert event is not None and event.details["token"] == "tenant-a-bot"
    assert event.tenant_id == fleet.tenant_a.pk and "tenant-a-bot" in event.actor_label
    assert Event.objects.get(verb="notification.channel_updated").details["secrets_changed"] == [
        "url"
    ]


@pytest.mark.parametrize(
    ("persona", "which", "status", "code"),
    [
        ("operator", "fleet", 204, ""),
        ("admin_a", "a", 204, ""),
        ("admin_a", "fleet", 404, "not_found"),
        ("admin_b", "a", 404, "not_found"),
        ("responder", "fleet", 403, "permission_denied"),
    ],
)
def test_channel_delete_per_persona(
    api: Api, channels: dict[str, Any], persona: str, which: str, status: int, code: str
) -> None:
    from updates.notifications.models import Channel

    channel = channels[which]
    response = api[persona].delete(f"/api/v1/channels/{channel.pk}/")
    if code:
        _error(response, status, code)
        assert Channel.objects.filter(pk=channel.pk).exists()
        return
    assert response.status_code == status, response.content
    assert not Channel.objects.filter(pk=channel.pk).exists()
    assert Event.objects.filter(verb="notification.channel_deleted").exists()
    audit = Event.objects.get(verb="api.channel.delete")
    assert audit.details["status"] == 204 and audit.details["token"].startswith(persona)
    assert audit.tenant_id == channel.tenant_id
    _error(api[persona].delete(f"/api/v1/channels/{channel.pk}/"), 404, "not_found")


# ------------------------------------------------------------------ tenants: windows, blackouts


WINDOW = {"days": [5, 6], "start_time": "02:00", "end_time": "04:00", "timezone": "UTC"}
BLACKOUT = {
    "name": "year end",
    "starts_local": "2099-12-24T00:00",
    "ends_local": "2099-12-27T00:00",
    "timezone": "Europe/Berlin",
}


def test_windows_list_and_edit(api: Api, fleet: Fleet, make_token: MakeToken) -> None:
    from tenants.models import MaintenanceWindow

    base = "/api/v1/tenants/tenant-a/windows/"
    persona = make_token("admin_a", name="sched-bot")
    first = persona.client.post(base, WINDOW, format="json").json()["id"]
    second = persona.client.post(
        base, {**WINDOW, "days": [0], "label": "monday"}, format="json"
    ).json()["id"]
    for reader in ("operator", "responder", "admin_a"):
        listed = api[reader].get(base)
        assert listed.status_code == 200, listed.content
        assert {w["id"] for w in listed.json()} == {first, second}
    _error(api["admin_b"].get(base), 404, "not_found")

    url = f"{base}{first}/"
    changed = {**WINDOW, "days": [6], "start_time": "01:00", "end_time": "05:30", "label": "sun"}
    response = persona.client.put(url, changed, format="json")
    assert response.status_code == 200, response.content
    window = MaintenanceWindow.objects.get(pk=first)
    assert window.days == "6" and window.label == "sun" and str(window.end_time) == "05:30:00"
    assert response.json()["label"] == "sun"
    # The edit page's rules: no overlap with another window, a known zone, its fields named.
    _error(persona.client.put(url, {**WINDOW, "days": [0]}, format="json"), 400, "invalid")
    body = _error(
        persona.client.put(url, {**WINDOW, "timezone": "Mars/Base"}, format="json"), 400, "invalid"
    )
    assert "timezone" in body["fields"]
    body = _error(persona.client.put(url, {"days": [9]}, format="json"), 400, "invalid")
    assert {"days", "start_time"} <= set(body["fields"])
    # The page's permissions: read-only for responders, unseen for tenant B's admin.
    _error(api["responder"].put(url, changed, format="json"), 403, "permission_denied")
    _error(api["admin_b"].put(url, changed, format="json"), 404, "not_found")
    _error(
        api["operator"].put(f"/api/v1/tenants/tenant-b/windows/{first}/", changed, format="json"),
        404,
        "not_found",
    )
    assert api["operator"].put(url, {**changed, "label": "ops"}, format="json").status_code == 200
    audit = Event.objects.filter(verb="api.tenant.window_update", details__status=200)
    assert {e.details["token"] for e in audit} == {"sched-bot", "operator-all-30"}
    assert all(e.tenant_id == fleet.tenant_a.pk for e in audit)
    assert Event.objects.filter(verb="window.updated").count() == 2


def test_window_and_blackout_creates_are_idempotent(api: Api) -> None:
    from tenants.models import Blackout, MaintenanceWindow

    headers = {"Idempotency-Key": "schedule-7"}
    client = api["admin_a"]
    for path, data in [
        ("/api/v1/tenants/tenant-a/windows/", WINDOW),
        ("/api/v1/tenants/tenant-a/blackouts/", BLACKOUT),
        ("/api/v1/blackouts/", BLACKOUT),
    ]:
        persona = api["operator"] if path == "/api/v1/blackouts/" else client
        first = persona.post(path, data, format="json", headers=headers)
        again = persona.post(path, data, format="json", headers=headers)
        assert first.status_code == again.status_code == 201, first.content
        assert first.json() == again.json() and again["Idempotent-Replayed"] == "true"
    assert MaintenanceWindow.objects.count() == 1
    assert Blackout.objects.filter(tenant__isnull=False).count() == 1
    assert Blackout.objects.filter(tenant__isnull=True).count() == 1


def test_fleet_wide_blackouts(api: Api, make_token: MakeToken, fleet: Fleet) -> None:
    from tenants.models import Blackout

    persona = make_token("operator", name="freeze-bot")
    response = persona.client.post("/api/v1/blackouts/", BLACKOUT, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["fleet_wide"] is True and body["timezone"] == "Europe/Berlin"
    blackout = Blackout.objects.get()
    assert blackout.tenant is None and blackout.starts_at.hour == 23  # 00:00 Berlin, in UTC
    audit = Event.objects.get(verb="api.blackout.fleet_create")
    assert audit.details["token"] == "freeze-bot" and audit.details["status"] == 201
    assert Event.objects.filter(verb="blackout.created", details__fleet_wide=True).exists()

    # Every role sees them (the tenant list page shows them to all), and on each tenant.
    for reader in ("operator", "responder", "admin_a", "admin_b"):
        listed = api[reader].get("/api/v1/blackouts/")
        assert [b["id"] for b in listed.json()] == [blackout.pk]
    own = api["admin_a"].post("/api/v1/tenants/tenant-a/blackouts/", BLACKOUT, format="json")
    assert own.status_code == 201, own.content
    on_a = api["admin_a"].get("/api/v1/tenants/tenant-a/blackouts/").json()
    assert {(b["id"], b["fleet_wide"]) for b in on_a} == {
        (blackout.pk, True),
        (own.json()["id"], False),
    }
    on_b = api["admin_b"].get("/api/v1/tenants/tenant-b/blackouts/").json()
    assert [b["id"] for b in on_b] == [blackout.pk]
    _error(api["admin_b"].get("/api/v1/tenants/tenant-a/blackouts/"), 404, "not_found")
    # Only a fleet-wide one through the fleet URL.
    assert [b["id"] for b in api["operator"].get("/api/v1/blackouts/").json()] == [blackout.pk]

    # Set and removed by operators alone, as on the tenant list page.
    for refused in ("admin_a", "responder"):
        _error(
            api[refused].post("/api/v1/blackouts/", BLACKOUT, format="json"),
            403,
            "permission_denied",
        )
        _error(api[refused].delete(f"/api/v1/blackouts/{blackout.pk}/"), 403, "permission_denied")
    no_admin = make_token("operator", scopes=["read", "deploy"], name="no-admin").client
    _error(no_admin.post("/api/v1/blackouts/", BLACKOUT, format="json"), 403, "scope_missing")
    body = _error(
        api["operator"].post(
            "/api/v1/blackouts/", {**BLACKOUT, "ends_local": "2099-12-23T00:00"}, format="json"
        ),
        400,
        "invalid",
    )
    assert "ends_local" in body["fields"]
    body = _error(api["operator"].post("/api/v1/blackouts/", {}, format="json"), 400, "invalid")
    assert {"name", "starts_local", "ends_local"} <= set(body["fields"])
    assert Blackout.objects.filter(tenant__isnull=True).count() == 1

    # A tenant's blackout is not deleted through the fleet URL, a fleet-wide one not through a
    # tenant's.
    _error(api["operator"].delete(f"/api/v1/blackouts/{own.json()['id']}/"), 404, "not_found")
    _error(
        api["operator"].delete(f"/api/v1/tenants/tenant-a/blackouts/{blackout.pk}/"),
        404,
        "not_found",
    )
    assert persona.client.delete(f"/api/v1/blackouts/{blackout.pk}/").status_code == 204
    assert not Blackout.objects.filter(tenant__isnull=True).exists()
    _error(persona.client.delete(f"/api/v1/blackouts/{blackout.pk}/"), 404, "not_found")
    audit = Event.objects.get(verb="api.blackout.fleet_delete", details__status=204)
    assert audit.details["token"] == "freeze-bot"


def test_a_body_in_a_media_type_no_parser_reads_is_a_documented_415(api: Api) -> None:
    schema = api["anonymous"].get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    paths = schema.json()["paths"]
    upload = paths["/api/v1/releases/"]["post"]["responses"]
    assert upload["415"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert "Error" in schema.json()["components"]["schemas"]
    # Only operations that read a body may answer it.
    assert "415" not in paths["/api/v1/releases/"]["get"]["responses"]
    for content_type in ("", "text/plain"):
        answer = api["operator"].generic(
            "POST", "/api/v1/releases/", data="bundle", content_type=content_type
        )
        _error(answer, 415, "unsupported_media_type")

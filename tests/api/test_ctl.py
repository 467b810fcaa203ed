"""themis-ctl against the live dashboard (a real HTTP server on the test database): output,
--json, and the exit codes a pipeline relies on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.utils import timezone
from pytest_django.live_server_helper import LiveServer

from tests.api.conftest import MakeToken
from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport
from tests.helpers import MakeBundle
from updates.api import ctl
from updates.api import services as api_services
from updates.api.models import ApiToken
from updates.jobs import services as jobs
from updates.models import Cluster, Release, Rollout

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def run(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """themis-ctl with a token: (exit code, stdout, stderr)."""
    monkeypatch.setenv("THEMIS_URL", live_server.url)

    def call(secret: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("THEMIS_TOKEN", secret)
        code = ctl.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


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


def test_nodes_list_is_scoped_to_the_tokens_user(run: Any, make_token: MakeToken) -> None:
    code, out, _ = run(make_token("admin_a").secret, "nodes", "list", "--json")
    assert code == ctl.OK
    assert {n["node_id"] for n in json.loads(out)} == {"a-1", "a-solo"}
    code, out, _ = run(make_token("operator").secret, "nodes", "list", "--cluster", "a-main")
    assert code == ctl.OK and out.split("\t")[0] == "a-1"


def test_expired_and_revoked_tokens_exit_10(run: Any, make_token: MakeToken) -> None:
    expired = make_token("operator", name="old")
    ApiToken.objects.filter(pk=expired.token.pk).update(expires_at=timezone.now())
    code, _, err = run(expired.secret, "nodes", "list")
    assert code == ctl.UNAUTHENTICATED and "token_expired" in err
    revoked = make_token("operator", name="gone")
    api_services.token_revoke(token=revoked.token, user=revoked.user)
    code, _, err = run(revoked.secret, "nodes", "list")
    assert code == ctl.UNAUTHENTICATED and "token_revoked" in err


def test_usage_errors_exit_2(run: Any, make_token: MakeToken, monkeypatch: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["rollout", "status"])
    assert exited.value.code == ctl.USAGE
    monkeypatch.delenv("THEMIS_URL")
    assert ctl.main(["nodes", "list"]) == ctl.USAGE


def test_release_upload_publish_and_deprecate(
    run: Any, make_token: MakeToken, trusted: Any, make_bundle: MakeBundle, tmp_path: Any
) -> None:
    secret = make_token("operator").secret
    bundle = str(make_bundle("1.8.0"))
    code, out, err = run(secret, "release", "upload", bundle, "--channel", "beta")
    assert code == ctl.OK, err
    assert "published themisdb 1.8.0" in out
    assert Release.objects.get().channel == "beta"
    # Already there: a conflict, and nothing new.
    code, _, err = run(secret, "release", "publish", bundle)
    assert code == ctl.CONFLICT and "ALREADY_PUBLISHED" in err
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk")
    code, _, err = run(secret, "release", "upload", str(junk))
    assert code == ctl.INVALID and "release_rejected" in err
    code, out, _ = run(secret, "release", "deprecate", "1.8.0")
    assert code == ctl.OK and "deprecated" in out
    assert Release.objects.count() == 1
    # A responder may not publish.
    code, _, _ = run(make_token("responder").secret, "release", "upload", bundle)
    assert code == ctl.FORBIDDEN


def test_rollout_create_status_and_refusals(
    run: Any, make_token: MakeToken, cluster_b: Cluster
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    operator = make_token("operator").secret
    code, out, _ = run(
        operator, "rollout", "create", "--release", "1.7.0", "--cluster", "b-main", "--json"
    )
    assert code == ctl.OK, out
    rollout = Rollout.objects.get()
    assert json.loads(out)["id"] == rollout.pk and rollout.release == release
    code, out, _ = run(operator, "rollout", "status", str(rollout.pk))
    assert code == ctl.OK and f"rollout {rollout.pk} RUNNING: 0/3 nodes" in out
    # Another tenant's admin: not found; a read-only token: forbidden.
    code, _, _ = run(make_token("admin_a").secret, "rollout", "status", str(rollout.pk))
    assert code == ctl.NOT_FOUND
    reader = make_token("operator", scopes=["read"], name="reader").secret
    code, _, err = run(reader, "rollout", "abort", str(rollout.pk))
    assert code == ctl.FORBIDDEN and "scope_missing" in err
    code, _, _ = run(operator, "rollout", "create", "--release", "9.9.9", "--cluster", "b-main")
    assert code == ctl.NOT_FOUND
    code, _, err = run(
        operator, "rollout", "create", "--release", "1.7.0", "--cluster", "b-main",
        "--stages", "50,10",
    )  # fmt: skip
    assert code == ctl.INVALID and "stages" in err
    code, out, _ = run(operator, "rollout", "abort", str(rollout.pk))
    assert code == ctl.OK and "ABORTING" in out
    code, _, _ = run(operator, "rollout", "start", str(rollout.pk))
    assert code == ctl.CONFLICT
    assert Rollout.objects.count() == 1


def test_status_wait_exits_by_how_the_rollout_settles(
    run: Any, make_token: MakeToken, cluster_b: Cluster
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    secret = make_token("operator").secret
    rollout = Rollout.objects.create(release=release, strategy="canary", state="AWAITING_APPROVAL")
    wait = ("rollout", "status", str(rollout.pk), "--wait", "--interval", "0.05")
    assert run(secret, *wait)[0] == ctl.ROLLOUT_NEEDS_PERSON
    Rollout.objects.filter(pk=rollout.pk).update(state="COMPLETED")
    assert run(secret, *wait)[0] == ctl.OK
    Rollout.objects.filter(pk=rollout.pk).update(state="FAILED")
    assert run(secret, *wait)[0] == ctl.ROLLOUT_UNSUCCESSFUL
    Rollout.objects.filter(pk=rollout.pk).update(state="RUNNING")
    code, _, err = run(secret, *wait, "--timeout", "0.2")
    assert code == ctl.WAIT_TIMEOUT and "still RUNNING" in err

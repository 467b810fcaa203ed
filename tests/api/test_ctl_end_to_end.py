"""A pipeline's day with themis-ctl, end to end: the installed console script uploads a signed
bundle, starts a canary on real agents, waits for approval, a responder's token approves, it
waits for completion; a tenant admin's token is refused on another tenant's rollout (404) and
an expired or revoked token gets 401 (exit 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.utils import timezone
from pytest_django.live_server_helper import LiveServer

from tests.api.conftest import MakeToken
from tests.factories import make_cluster, make_node, make_tenant
from tests.fleet_stack import NEW, StartFleet
from tests.helpers import MakeBundle, tree
from updates.api import ctl
from updates.api import services as api_services
from updates.api.models import ApiToken
from updates.models import Event, Node, Rollout

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

THEMIS_CTL = Path(sys.executable).parent / "themis-ctl"


def _ctl(
    url: str, secret: str, *argv: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "THEMIS_URL": url, "THEMIS_TOKEN": secret}
    return subprocess.run(
        [str(THEMIS_CTL), *argv], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_pipeline_canary_with_approval_on_real_agents(
    real_fleet: StartFleet,
    live_server: LiveServer,
    make_token: MakeToken,
    make_bundle: MakeBundle,
) -> None:
    tenant = make_tenant(name="E2E", slug="e2e")
    cluster = make_cluster(tenant=tenant, name="e2e-main")
    nodes = [
        make_node(
            node_id=f"e2e-{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.6.0",
            raft_role="leader" if i == 3 else "follower",
        )
        for i in range(4)
    ]
    real = real_fleet(nodes)
    url = live_server.url
    operator = make_token("operator", scopes=["read", "deploy"], name="pipeline").secret
    responder = make_token("responder", scopes=["read", "approve"], name="on-call").secret

    bundle = make_bundle("1.7.0", files=NEW)
    done = _ctl(url, operator, "release", "upload", str(bundle))
    assert done.returncode == ctl.OK, done.stderr
    assert "published themisdb 1.7.0" in done.stdout

    done = _ctl(
        url, operator, "--json", "rollout", "create", "--release", "1.7.0",
        "--cluster", "e2e-main", "--stages", "25,100",
    )  # fmt: skip
    assert done.returncode == ctl.OK, done.stderr
    rollout_id = str(json.loads(done.stdout)["id"])

    # The canary's first node updates, the gate passes, and a person must approve.
    done = _ctl(url, operator, "rollout", "status", rollout_id, "--wait", "--interval", "0.5")
    assert done.returncode == ctl.ROLLOUT_NEEDS_PERSON, done.stdout + done.stderr + real.logs()
    assert "AWAITING_APPROVAL" in done.stdout

    # Tenant A's admin cannot see this tenant's rollout; a pipeline token may not approve.
    admin_a = make_token("admin_a").secret
    assert _ctl(url, admin_a, "rollout", "status", rollout_id).returncode == ctl.NOT_FOUND
    assert _ctl(url, operator, "rollout", "approve", rollout_id).returncode == ctl.FORBIDDEN

    done = _ctl(url, responder, "rollout", "approve", rollout_id)
    assert done.returncode == ctl.OK, done.stderr

    done = _ctl(url, operator, "rollout", "status", rollout_id, "--wait", "--interval", "0.5")
    assert done.returncode == ctl.OK, done.stdout + done.stderr + real.logs()
    rollout = Rollout.objects.get(pk=rollout_id)
    assert rollout.state == Rollout.State.COMPLETED
    for node in nodes:
        assert tree(real.install(node)) == NEW
    assert set(Node.objects.filter(tenant=tenant).values_list("installed_version", flat=True)) == {
        "1.7.0"
    }
    # Both approval attempts are in the audit log, each naming its token.
    attempts = Event.objects.filter(verb="api.rollout.approve").order_by("id")
    assert [(e.details["token"], e.details["status"]) for e in attempts] == [
        ("pipeline", 403),
        ("on-call", 200),
    ]

    # An expired or revoked token is refused (401: exit 10).
    ApiToken.objects.filter(name="pipeline").update(expires_at=timezone.now())
    assert _ctl(url, operator, "nodes", "list").returncode == ctl.UNAUTHENTICATED
    on_call = ApiToken.objects.get(name="on-call")
    api_services.token_revoke(token=on_call, user=on_call.user)
    done = _ctl(url, responder, "rollout", "status", rollout_id)
    assert done.returncode == ctl.UNAUTHENTICATED and "token_revoked" in done.stderr

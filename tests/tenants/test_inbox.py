"""The header's inbox: what waits on the signed-in user, counted on every page and listed on
/notifications/inbox/. Consents go to the admins of the tenant whose nodes wait (not to
operators, not to another tenant's admin) and leave once granted; canary approvals go to
those who may approve."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tenants.models import Consent
from tenants.roles import OPERATOR
from tests.conftest import Fleet
from tests.factories import make_user
from tests.tenants.conftest import waiting_job
from updates.models import Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db

WAITING = UpdateJob.State.WAITING_FOR_CONSENT


def _badge(client: Client) -> int:
    """The count in the header of an ordinary page (0 when it shows none)."""
    body = client.get(reverse("release_list")).content.decode()
    assert 'id="inbox-link"' in body
    found = re.search(r'id="inbox-badge">(\d+)<', body)
    return int(found.group(1)) if found else 0


def _inbox(client: Client) -> str:
    response = client.get(reverse("notifications:inbox"))
    assert response.status_code == 200
    return response.content.decode()


def test_a_consent_waits_on_its_tenants_admin_only(
    personas: dict[str, Client], fleet: Fleet, release: Release
) -> None:
    waiting_job(fleet.node_a, release, WAITING)
    waiting_job(fleet.node_a_standalone, release, WAITING)
    assert _badge(personas["admin_a"]) == 1  # one release of one tenant, two nodes
    body = _inbox(personas["admin_a"])
    row = body[body.index('data-consent="tenant-a:themisdb 1.7.0"') :]
    row = row[: row.index("</tr>")]
    assert "<td>2</td>" in row and reverse("tenant_detail", args=["tenant-a"]) in row
    for persona in ("admin_b", "operator", "responder"):
        assert _badge(personas[persona]) == 0, persona
        assert "data-consent=" not in _inbox(personas[persona])


def test_a_granted_consent_no_longer_waits_but_an_expired_one_does(
    personas: dict[str, Client], fleet: Fleet, release: Release
) -> None:
    waiting_job(fleet.node_a, release, WAITING)
    now = timezone.now()
    consent = Consent.objects.create(
        tenant=fleet.tenant_a,
        release=release,
        decision=Consent.Decision.GRANTED,
        decided_at=now,
        expires_at=now + timedelta(days=3),
    )
    assert _badge(personas["admin_a"]) == 0
    Consent.objects.filter(pk=consent.pk).update(expires_at=now - timedelta(seconds=1))
    assert _badge(personas["admin_a"]) == 1


def test_two_releases_and_two_tenants_count_apart(
    personas: dict[str, Client], fleet: Fleet, release: Release
) -> None:
    other = Release.objects.create(
        product="themisdb", version="1.8.0", sha256="cd" * 32, state=release.state
    )
    waiting_job(fleet.node_a, release, WAITING)
    waiting_job(fleet.node_a_standalone, other, WAITING)
    waiting_job(fleet.node_b, release, WAITING)
    fleet.tenant_b.admins.add(get_user_model().objects.get(username="alice"))
    assert _badge(personas["admin_a"]) == 3
    assert _badge(personas["admin_b"]) == 1


def test_a_canary_waiting_for_approval_is_counted_for_who_may_approve(
    personas: dict[str, Client], fleet: Fleet, release: Release
) -> None:
    rollout = Rollout.objects.create(
        release=release,
        strategy=Rollout.Strategy.CANARY,
        state=Rollout.State.AWAITING_APPROVAL,
        cluster=fleet.cluster_a,
    )
    for persona in ("responder", "operator"):
        assert _badge(personas[persona]) == 1, persona
        body = _inbox(personas[persona])
        assert f'data-rollout="{rollout.pk}"' in body
        assert reverse("rollout_detail", args=[rollout.pk]) in body
    assert _badge(personas["admin_a"]) == 0
    Rollout.objects.filter(pk=rollout.pk).update(state=Rollout.State.RUNNING)
    assert _badge(personas["responder"]) == 0
    assert "No canary waits" in _inbox(personas["responder"])


def test_a_role_named_like_its_user_is_not_repeated_in_the_header(
    personas: dict[str, Client], roles: None
) -> None:
    body = personas["operator"].get(reverse("release_list")).content.decode()
    assert "<span>olivia · operator</span>" in body
    demo = make_user(username="operator")
    demo.groups.add(Group.objects.get(name=OPERATOR))
    client = Client()
    client.force_login(demo)
    body = client.get(reverse("release_list")).content.decode()
    assert "<span>operator</span>" in body and "operator · operator" not in body

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest
from django.contrib.auth import get_user_model

from tenants.models import MaintenanceWindow, UpdatePolicy
from tests.factories import ReleaseFactory
from updates.models import UpdateJob


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def users(personas):
    """The persona users themselves (the `personas` fixture gives their clients)."""
    model = get_user_model()
    return {
        name: model.objects.get(username=username)
        for name, username in {
            "operator": "olivia",
            "admin_a": "alice",
            "admin_b": "bob",
            "responder": "rita",
        }.items()
    }


@pytest.fixture
def release(db):
    return ReleaseFactory(version="1.7.0")


@pytest.fixture
def night_window(fleet):
    """Tenant A: daily 02:00-04:00 New York time."""
    return MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=time(2),
        end_time=time(4),
        timezone="America/New_York",
    )


@pytest.fixture
def consent_required(fleet):
    return UpdatePolicy.objects.create(tenant=fleet.tenant_a, requires_consent=True)


def waiting_job(node, release, state=UpdateJob.State.WAITING_FOR_WINDOW, reason="") -> UpdateJob:
    return UpdateJob.objects.create(node=node, release=release, state=state, wait_reason=reason)

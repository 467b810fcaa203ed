from __future__ import annotations

from datetime import UTC, datetime, time

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.test import Client

from tenants.models import MaintenanceWindow, UpdatePolicy
from tests.conftest import Fleet
from tests.factories import make_release
from updates.models import Node, Release, UpdateJob


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def users(personas: dict[str, Client]) -> dict[str, User]:
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
def release(db: None) -> Release:
    return make_release(version="1.7.0")


@pytest.fixture
def night_window(fleet: Fleet) -> MaintenanceWindow:
    """Tenant A: daily 02:00-04:00 New York time."""
    return MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=time(2),
        end_time=time(4),
        timezone="America/New_York",
    )


@pytest.fixture
def consent_required(fleet: Fleet) -> UpdatePolicy:
    return UpdatePolicy.objects.create(tenant=fleet.tenant_a, requires_consent=True)


def waiting_job(
    node: Node,
    release: Release,
    state: UpdateJob.State = UpdateJob.State.WAITING_FOR_WINDOW,
    reason: str = "",
) -> UpdateJob:
    return UpdateJob.objects.create(node=node, release=release, state=state, wait_reason=reason)

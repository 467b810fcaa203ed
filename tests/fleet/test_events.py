"""The audit log is append-only: no update or delete path anywhere."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import Fleet
from updates.audit import event_log
from updates.models import AppendOnlyError, Event

pytestmark = pytest.mark.django_db


@pytest.fixture
def event(fleet: Fleet) -> Event:
    return event_log(verb="test.created", tenant=fleet.tenant_a, obj=fleet.node_a)


def test_event_records_actor_tenant_and_object(event: Event, fleet: Fleet) -> None:
    assert event.actor_label == "system"
    assert event.tenant_id == fleet.tenant_a.pk
    assert (event.object_type, event.object_id) == ("node", str(fleet.node_a.pk))


def test_save_of_existing_event_is_refused(event: Event) -> None:
    event.verb = "test.rewritten"
    with pytest.raises(AppendOnlyError):
        event.save()
    assert Event.objects.get(pk=event.pk).verb == "test.created"


def test_instance_delete_is_refused(event: Event) -> None:
    with pytest.raises(AppendOnlyError):
        event.delete()
    assert Event.objects.filter(pk=event.pk).exists()


def test_queryset_update_and_delete_are_refused(event: Event) -> None:
    with pytest.raises(AppendOnlyError):
        Event.objects.filter(pk=event.pk).update(verb="x")
    with pytest.raises(AppendOnlyError):
        Event.objects.all().delete()
    assert Event.objects.get(pk=event.pk).verb == "test.created"


def test_deleting_the_actor_keeps_history(fleet: Fleet) -> None:
    from tests.factories import make_user

    user = make_user(username="temp")
    ev = event_log(verb="test.by_user", actor=user, tenant=fleet.tenant_a)
    user.delete()
    again = Event.objects.get(pk=ev.pk)
    assert again.actor_label == "temp"


def test_admin_offers_no_change_or_delete(admin_client: Client, event: Event) -> None:
    from django.urls import reverse

    change = admin_client.get(reverse("admin:updates_event_change", args=[event.pk]))
    assert change.status_code == 200
    assert b'name="_save"' not in change.content
    delete = admin_client.post(reverse("admin:updates_event_delete", args=[event.pk]))
    assert delete.status_code == 403
    assert Event.objects.filter(pk=event.pk).exists()


def test_role_groups_carry_their_permissions(roles: None) -> None:
    from django.contrib.auth.models import Group

    from tenants.roles import ROLE_PERMISSIONS

    for role, perms in ROLE_PERMISSIONS.items():
        group = Group.objects.get(name=role)
        have = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.all()}
        assert have == set(perms)

"""User management without the Django admin: operators create people with a role (and, for a
tenant admin, their tenants), change it, deactivate and set passwords; every change audited;
weak passwords and duplicates refused with the reason; nobody locks themselves out."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from updates.models import Event

pytestmark = pytest.mark.django_db
User = get_user_model()


def test_an_operator_creates_a_tenant_admin_who_can_then_sign_in(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    response = personas["operator"].post(
        reverse("user_create"),
        {
            "username": "tina",
            "password": "a long enough passphrase",
            "role": "tenant_admin",
            "tenants": [fleet.tenant_a.pk],
        },
    )
    assert response.status_code == 302
    tina = User.objects.get(username="tina")
    assert list(tina.groups.values_list("name", flat=True)) == ["tenant_admin"]
    assert list(tina.administered_tenants.all()) == [fleet.tenant_a]
    event = Event.objects.get(verb="user.created")
    assert event.details == {"username": "tina", "role": "tenant_admin", "tenants": ["tenant-a"]}
    assert "passphrase" not in str(event.details)
    listing = personas["operator"].get(reverse("user_list")).content.decode()
    row = listing[listing.index('data-user="tina"') :]
    assert "Tenant A" in row[: row.index("</tr>")]
    signed_in = Client().post(
        reverse("login"), {"username": "tina", "password": "a long enough passphrase"}
    )
    assert signed_in.status_code == 302  # through the login form, as a person signs in


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"username": "olivia"}, "username", "exists already"),
        ({"password": "short"}, "password", "too short"),
        ({"password": "password123"}, "password", "too common"),
        ({"tenants": []}, "tenants", "at least one tenant"),
        ({"username": "bad name!"}, "username", "letters, digits"),
    ],
)
def test_a_refused_user_names_the_field_and_is_not_created(
    personas: dict[str, Client], fleet: Fleet, data: dict[str, object], field: str, reason: str
) -> None:
    before = User.objects.count()
    sent = {
        "username": "newbie",
        "password": "a long enough passphrase",
        "role": "tenant_admin",
        "tenants": [fleet.tenant_a.pk],
        **data,
    }
    response = personas["operator"].post(reverse("user_create"), sent)
    assert response.status_code == 400
    body = response.content.decode()
    named = body[body.index(f'data-field="{field}"') :]
    assert reason in named[: named.index("</p>")]
    assert User.objects.count() == before and not Event.objects.filter(verb="user.created")


def test_a_role_change_deactivation_and_new_password_are_audited(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    alice = User.objects.get(username="alice")
    url = reverse("user_edit", args=[alice.pk])
    client = personas["operator"]
    assert client.post(url, {"role": "responder", "active": "on"}).status_code == 302
    alice.refresh_from_db()
    assert list(alice.groups.values_list("name", flat=True)) == ["responder"]
    assert not alice.administered_tenants.exists()  # a responder administers no tenant
    assert client.post(url, {"role": "responder"}).status_code == 302  # active unticked
    alice.refresh_from_db()
    assert alice.is_active is False
    weak = client.post(url, {"set_password": "1", "password": "123"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()
    assert (
        client.post(url, {"set_password": "1", "password": "another long passphrase"}).status_code
        == 302
    )
    alice.refresh_from_db()
    assert alice.check_password("another long passphrase")
    verbs = list(Event.objects.filter(verb__startswith="user.").values_list("verb", flat=True))
    assert sorted(verbs) == ["user.password_set", "user.updated", "user.updated"]


def test_an_operator_cannot_lock_themselves_out(personas: dict[str, Client]) -> None:
    olivia = User.objects.get(username="olivia")
    url = reverse("user_edit", args=[olivia.pk])
    for data in ({"role": "operator"}, {"role": "responder", "active": "on"}):
        response = personas["operator"].post(url, data)
        assert response.status_code == 400
        assert "cannot deactivate yourself" in response.content.decode()
    olivia.refresh_from_db()
    assert olivia.is_active and olivia.groups.filter(name="operator").exists()


@pytest.mark.parametrize("persona", ["responder", "admin_a"])
def test_only_operators_manage_users(personas: dict[str, Client], persona: str) -> None:
    client = personas[persona]
    assert client.get(reverse("user_list")).status_code == 403
    sent = {"username": "x", "password": "a long enough passphrase", "role": "operator"}
    assert client.post(reverse("user_create"), sent).status_code == 403
    assert not User.objects.filter(username="x").exists()
    assert 'href="/users/"' not in client.get(reverse("release_list")).content.decode()

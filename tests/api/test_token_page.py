"""The profile page where users make and revoke API tokens: the secret is shown once, only its
digest is stored, a user reaches only their own tokens, and the page passes the CSP."""

from __future__ import annotations

import hashlib
import re

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.project.test_security_headers import InlineFinder
from updates.api.models import ApiToken
from updates.models import Event

pytestmark = pytest.mark.django_db


def _create(client: Client, **data: object) -> str:
    fields = {"name": "deploy-bot", "days": "30", "scopes": ["read", "deploy"], **data}
    response = client.post(reverse("api_token_create"), fields)
    return response.content.decode() if response.status_code == 201 else ""


def test_a_token_is_shown_once_and_stored_as_a_digest(personas: dict[str, Client]) -> None:
    page = _create(personas["operator"])
    secret = re.search(r'id="token-secret">(thm_[^<]+)<', page)
    assert secret is not None
    token = ApiToken.objects.get()
    assert token.user == User.objects.get(username="olivia")
    assert token.scopes == ["read", "deploy"] and token.name == "deploy-bot"
    assert token.secret_sha256 == hashlib.sha256(secret.group(1).encode()).hexdigest()
    listing = personas["operator"].get(reverse("api_tokens")).content.decode()
    assert secret.group(1) not in listing and token.prefix in listing
    assert Event.objects.filter(verb="api_token.created", actor=token.user).exists()
    # It works on the API at once.
    response = Client().get("/api/v1/token/", HTTP_AUTHORIZATION=f"Bearer {secret.group(1)}")
    assert response.status_code == 200 and response.json()["name"] == "deploy-bot"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": ""}, "name"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["root"]}, "scopes"),
        ({"days": "0"}, "days"),
        ({"days": "99999999999999999999"}, "days"),
        ({"days": "٣"}, "days"),
    ],
)
def test_invalid_requests_name_the_field_and_make_nothing(
    personas: dict[str, Client], data: dict[str, object], field: str
) -> None:
    response = personas["operator"].post(
        reverse("api_token_create"), {"name": "x", "days": "30", "scopes": ["read"], **data}
    )
    assert response.status_code == 400
    assert f"{field}:" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_a_second_token_of_the_same_name_is_refused(personas: dict[str, Client]) -> None:
    assert _create(personas["operator"])
    assert not _create(personas["operator"])
    assert ApiToken.objects.count() == 1


def test_revoke_own_token_only(personas: dict[str, Client], fleet: Fleet) -> None:
    assert _create(personas["admin_a"])
    token = ApiToken.objects.get()
    url = reverse("api_token_revoke", args=[token.pk])
    assert personas["admin_b"].post(url).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None
    assert personas["admin_a"].post(url).status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert Event.objects.filter(verb="api_token.revoked").count() == 1
    # A second revoke changes nothing and logs nothing.
    assert personas["admin_a"].post(url).status_code == 302
    assert Event.objects.filter(verb="api_token.revoked").count() == 1


def test_anonymous_is_sent_to_login(personas: dict[str, Client]) -> None:
    response = personas["anonymous"].get(reverse("api_tokens"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert personas["anonymous"].post(reverse("api_token_create"), {"name": "x"}).status_code == 302
    assert not ApiToken.objects.exists()


@pytest.mark.parametrize("url", [reverse("api_tokens"), reverse("api_docs")])
def test_pages_pass_the_content_security_policy(personas: dict[str, Client], url: str) -> None:
    response = personas["operator"].get(url)
    assert response.status_code == 200
    finder = InlineFinder()
    finder.feed(response.content.decode())
    assert finder.blocked == []

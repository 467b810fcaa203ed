"""API personas: the `personas` users, each with an API token of every scope, and a helper
to make tokens of other scopes or lifetimes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from rest_framework.test import APIClient

from updates.api import services
from updates.api.models import ApiToken, Scope

# The users behind the `personas` clients.
USERNAMES = {"operator": "olivia", "admin_a": "alice", "admin_b": "bob", "responder": "rita"}
ALL_SCOPES = list(Scope.values)


@dataclass
class ApiPersona:
    user: User
    token: ApiToken
    secret: str
    client: APIClient


MakeToken = Callable[..., ApiPersona]


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture(autouse=True)
def _fresh_throttle() -> None:
    """Throttle counts live in the cache: no test inherits another's."""
    cache.clear()


@pytest.fixture
def make_token(personas: dict[str, Client]) -> MakeToken:
    def make(
        persona: str, *, scopes: list[str] | None = None, days: int = 30, name: str = ""
    ) -> ApiPersona:
        user = User.objects.get(username=USERNAMES[persona])
        new = services.token_create(
            user=user,
            name=name or f"{persona}-{'-'.join(scopes or ['all'])}-{days}",
            scopes=ALL_SCOPES if scopes is None else scopes,
            days=days,
        )
        return ApiPersona(user=user, token=new.token, secret=new.secret, client=bearer(new.secret))

    return make


@pytest.fixture
def api(make_token: MakeToken) -> dict[str, APIClient]:
    """API clients with a token of every scope, per persona, plus an anonymous one."""
    clients = {persona: make_token(persona).client for persona in USERNAMES}
    clients["anonymous"] = APIClient()
    return clients

"""Who may call the API: token authentication, scopes with the pages' permissions, and
per-token throttling. Loaded by DRF's settings, so it imports nothing of DRF's views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from updates.api import services
from updates.api.models import ApiToken, Scope

# ------------------------------------------------------------------ authentication


class TokenAuthentication(BaseAuthentication):
    """`Authorization: Bearer thm_…`: the user whose token it is, with the token as
    `request.auth`. An unknown, revoked or expired token is a 401 naming which."""

    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "the Authorization header must be 'Bearer <token>'", code="token_invalid"
            )
        try:
            secret = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "the token is not valid", code="token_invalid"
            ) from None
        try:
            token = services.token_authenticate(secret)
        except services.TokenRefused as refused:
            raise exceptions.AuthenticationFailed(refused.message, code=refused.code) from None
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


# ------------------------------------------------------------------ permissions


@dataclass(frozen=True)
class Rule:
    """What one method of a view needs: a token scope, and (unless None) the permission the
    page for the same action requires."""

    scope: str = Scope.READ
    perm: str | None = None


READ = Rule()


class ScopeAndRole(BasePermission):
    """A signed-in user; with a token, the scope the method needs; and the page's permission.
    What objects they reach is the views' business: the pages' scoped selectors, 404 outside."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            raise exceptions.NotAuthenticated()
        rules: dict[str, Rule] = getattr(view, "rules", {})
        method = "GET" if request.method in ("HEAD", "OPTIONS") else str(request.method)
        rule = rules.get(method, READ)
        token = request.auth
        if isinstance(token, ApiToken) and not token.has_scope(rule.scope):
            raise exceptions.PermissionDenied(
                f"this token lacks the {rule.scope!r} scope", code="scope_missing"
            )
        if rule.perm is not None and not request.user.has_perm(rule.perm):
            raise exceptions.PermissionDenied(
                "your role does not allow this", code="permission_denied"
            )
        return True


# ------------------------------------------------------------------ throttling


class TokenRateThrottle(SimpleRateThrottle):
    """THEMIS_API_RATE requests per token (per user for the browser's session)."""

    scope = "api"

    def get_rate(self) -> str:
        return str(settings.THEMIS_API_RATE)

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        if isinstance(request.auth, ApiToken):
            ident = f"token-{request.auth.pk}"
        elif request.user and request.user.is_authenticated:
            ident = f"user-{request.user.pk}"
        else:
            ident = f"addr-{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}

"""The profile page where a user makes and revokes their API tokens (the secret is shown
once), and the API's own view of the calling token."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from updates.api import selectors, services
from updates.api.models import ApiToken, Scope
from updates.api.serializers import TokenSerializer
from updates.api.views.access import READ
from updates.api.views.base import ApiError, ApiView
from updates.api.views.releases import ERRORS

DAY_CHOICES = (7, 30, 90, 365)


def _owner(request: HttpRequest) -> User:
    if not isinstance(request.user, User):
        raise PermissionDenied
    return request.user


@require_GET
def token_page(request: HttpRequest) -> HttpResponse:
    return _page(request)


def _page(
    request: HttpRequest, *, secret: str = "", error: str = "", status: int = 200
) -> HttpResponse:
    context = {
        "tokens": selectors.tokens_for_user(_owner(request)),
        "scopes": Scope.choices,
        "day_choices": DAY_CHOICES,
        "secret": secret,
        "error": error,
    }
    return render(request, "api/tokens.html", context, status=status)


@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    days_text = (request.POST.get("days") or "").strip()
    days = (
        int(days_text) if days_text.isascii() and days_text.isdigit() and len(days_text) < 5 else 0
    )
    try:
        new = services.token_create(
            user=_owner(request),
            name=request.POST.get("name") or "",
            scopes=request.POST.getlist("scopes"),
            days=days,
        )
    except services.TokenError as err:
        return _page(request, error=f"{err.field}: {err.message}", status=400)
    # Rendered, not redirected: the secret exists only in this response.
    return _page(request, secret=new.secret, status=201)


@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(selectors.tokens_for_user(_owner(request)), pk=token_id)
    if services.token_revoke(token=token, user=_owner(request)):
        messages.success(request, f"Token {token.name} revoked.")
    else:
        messages.info(request, f"Token {token.name} was revoked already.")
    return redirect("api_tokens")


class WhoAmI(ApiView):
    rules = {"GET": READ}

    @extend_schema(operation_id="token_retrieve", responses={200: TokenSerializer, **ERRORS})
    def get(self, request: Request) -> Response:
        """The token this request came with (who it belongs to is the audit log's business)."""
        if not isinstance(request.auth, ApiToken):
            raise ApiError(404, "not_found", "this request came without an API token")
        return Response(TokenSerializer(request.auth).data)

"""Writes of the API: tokens (made, revoked, used), idempotent responses, the audit line of
every API action."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from updates.api.models import ApiToken, IdempotencyRecord, Scope
from updates.audit import event_log

# Every secret starts with this, so a leaked one is recognisable (secret scanners, logs).
TOKEN_PREFIX = "thm_"  # noqa: S105 - a public marker, not a secret
MAX_TOKEN_DAYS = 366
# A retry with an Idempotency-Key is answered from its record this long; older records go.
IDEMPOTENCY_TTL = timedelta(hours=24)
# last_used_at is written at most this often per token: not one write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class TokenError(Exception):
    """A token request that cannot be done; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class TokenRefused(Exception):
    """A presented secret that does not authenticate; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class NewToken:
    token: ApiToken
    # Shown once to its owner; only its digest is stored.
    secret: str


@transaction.atomic
def token_create(*, user: User, name: str, scopes: list[str], days: int) -> NewToken:
    name = name.strip()
    if not name or len(name) > 100:
        raise TokenError("name", "a token needs a name of 1 to 100 characters")
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise TokenError("scopes", f"unknown scope {unknown[0]!r}")
    if not scopes:
        raise TokenError("scopes", "choose at least one scope")
    if not 1 <= days <= MAX_TOKEN_DAYS:
        raise TokenError("days", f"a token lives 1 to {MAX_TOKEN_DAYS} days")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            token = ApiToken.objects.create(
                user=user,
                name=name,
                prefix=secret[: len(TOKEN_PREFIX) + 6],
                secret_sha256=secret_digest(secret),
                scopes=[s for s in Scope.values if s in scopes],
                expires_at=timezone.now() + timedelta(days=days),
            )
    except IntegrityError:
        raise TokenError("name", f"you already have a token named {name!r}") from None
    event_log(
        verb="api_token.created",
        actor=user,
        obj=token,
        details={"token": token.name, "scopes": token.scopes, "expires": str(token.expires_at)},
    )
    return NewToken(token=token, secret=secret)


@transaction.atomic
def token_revoke(*, token: ApiToken, user: User) -> bool:
    """Revoke a token at once; False when it was revoked already."""
    revoked = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    if revoked:
        event_log(verb="api_token.revoked", actor=user, obj=token, details={"token": token.name})
    return bool(revoked)


def token_authenticate(secret: str) -> ApiToken:
    """The usable token behind `secret`, with its last-used time brought up to date."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        raise TokenRefused("token_invalid", "the token is not valid")
    token = (
        ApiToken.objects.select_related("user").filter(secret_sha256=secret_digest(secret)).first()
    )
    if token is None or not token.user.is_active:
        raise TokenRefused("token_invalid", "the token is not valid")
    if token.revoked_at is not None:
        raise TokenRefused("token_revoked", f"the token {token.name!r} was revoked")
    if token.is_expired:
        raise TokenRefused("token_expired", f"the token {token.name!r} has expired")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def api_action_log(
    *,
    token: ApiToken,
    action: str,
    method: str,
    path: str,
    status: int,
    tenant: int | None = None,
    replayed: bool = False,
) -> None:
    """One audit Event per API action, naming the token it came with."""
    details: dict[str, Any] = {
        "token": token.name,
        "token_id": token.pk,
        "method": method,
        "path": path[:300],
        "status": status,
    }
    if replayed:
        details["replayed"] = True
    event_log(
        verb=f"api.{action}"[:64],
        actor=token.user,
        actor_label=f"{token.user.get_username()} (token {token.name})"[:150],
        tenant=tenant,
        details=details,
    )


def idempotency_claim(*, user: User, key: str, endpoint: str) -> IdempotencyRecord | None:
    """The stored record for this key, or None when the key is new. Called inside the
    transaction that also runs the request and stores its response, so two racing
    requests with one key cannot both start."""
    return (
        IdempotencyRecord.objects.select_for_update()
        .filter(
            user=user, key=key, endpoint=endpoint, created_at__gte=timezone.now() - IDEMPOTENCY_TTL
        )
        .first()
    )


def idempotency_store(
    *,
    user: User,
    key: str,
    endpoint: str,
    fingerprint: str,
    status_code: int,
    response: Any,
) -> None:
    # Records past their time are dropped here, as new ones arrive: no sweeper to run.
    IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - IDEMPOTENCY_TTL).delete()
    IdempotencyRecord.objects.create(
        user=user,
        key=key,
        endpoint=endpoint,
        fingerprint=fingerprint,
        status_code=status_code,
        response=response,
    )

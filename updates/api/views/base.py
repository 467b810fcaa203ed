"""What every API view shares: errors as JSON, the audit line naming the token, and
Idempotency-Key replays (who may call is `access`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.files.uploadedfile import UploadedFile
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.forms import BaseForm
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from updates.api import services
from updates.api.errors import error_body
from updates.api.models import ApiToken
from updates.api.views.access import Rule

# ------------------------------------------------------------------ errors

FormT = TypeVar("FormT", bound=BaseForm)


class ApiError(exceptions.APIException):
    """A refusal with its own status and stable code (409 conflicts, 422 ...)."""

    def __init__(
        self, status_code: int, code: str, message: str, fields: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status_code = status_code
        self.fields = fields or {}


# DRF's own codes, renamed where the API's are more telling.
_CODES = {
    "not_authenticated": "not_authenticated",
    "authentication_failed": "token_invalid",
    "permission_denied": "permission_denied",
    "not_found": "not_found",
    "method_not_allowed": "method_not_allowed",
    "not_acceptable": "not_acceptable",
    "unsupported_media_type": "unsupported_media_type",
    "throttled": "throttled",
    "parse_error": "parse_error",
}


def _messages(detail: Any) -> list[str]:
    if isinstance(detail, dict):
        return [f"{k}: {m}" for k, v in detail.items() for m in _messages(v)]
    if isinstance(detail, list):
        return [m for item in detail for m in _messages(item)]
    return [str(detail)]


def json_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every error as {"code", "message"} (and "fields" for invalid input)."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "not found")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response
    if isinstance(exc, ApiError):
        response.data = error_body(str(exc.get_codes()), str(exc.detail), exc.fields)
        return response
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        fields = {str(k): _messages(v) for k, v in detail.items()}
        response.data = error_body("invalid", "; ".join(_messages(detail)), fields)
        return response
    codes = exc.get_codes()
    code = codes if isinstance(codes, str) else exc.default_code
    response.data = error_body(_CODES.get(str(code), str(code)), str(exc.detail))
    return response


@csrf_exempt
def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any other path under /api/: a JSON 404, not the HTML one of the pages (and for a POST
    not the HTML 403 of the CSRF check: the API takes no cookies to forge)."""
    return JsonResponse(error_body("not_found", "no such API endpoint"), status=404)


def invalid(fields: dict[str, list[str]]) -> ApiError:
    """A 400 `invalid` naming each field (a form's `__all__` as `non_field_errors`)."""
    fields = {("non_field_errors" if k == "__all__" else k): v for k, v in fields.items()}
    message = "; ".join(f"{k}: {m}" for k, msgs in fields.items() for m in msgs)
    return ApiError(400, "invalid", message, fields)


def form_valid(form: FormT) -> FormT:
    """`form` when a page's form accepts the request; else a 400 naming its fields."""
    if not form.is_valid():
        raise invalid({k: [str(m) for m in v] for k, v in form.errors.items()})
    return form


def refused(error: DjangoValidationError) -> ApiError:
    """A service's ValidationError, on the fields it names."""
    if hasattr(error, "error_dict"):
        return invalid({k: [str(m) for m in v] for k, v in error.message_dict.items()})
    return invalid({"non_field_errors": [str(m) for m in error.messages]})


# ------------------------------------------------------------------ pagination


def strict_page_size(request: Request, default: int, maximum: int) -> int:
    """`?page_size=`: 1 to `maximum`, or the default when absent; anything else is a 400 naming
    the parameter (a silent fallback would hide a client's mistake)."""
    text = request.query_params.get("page_size")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and 1 <= int(text[:8]) <= maximum and len(text) <= 8):
        raise ApiError(
            400,
            "invalid",
            f"page_size: a whole number from 1 to {maximum}",
            {"page_size": [f"a whole number from 1 to {maximum}"]},
        )
    return int(text)


def choice_param(request: Request, name: str, choices: list[str]) -> str:
    """A query parameter that must be one of `choices` ("" when absent): else a 400 naming it."""
    value = str(request.query_params.get(name, ""))
    if value and value not in choices:
        raise ApiError(
            400,
            "invalid",
            f"{name}: not one of {', '.join(choices)}",
            {name: [f"not one of {', '.join(choices)}"]},
        )
    return value


# ------------------------------------------------------------------ the base view


class ApiView(APIView):
    """The base of every API view. `rules` says what each method needs; `actions` names what a
    writing method does for the audit log (`api.<action>`)."""

    rules: dict[str, Rule] = {}
    actions: dict[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_tenant: int | None = None
        self.replayed = False

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        # The API answers 401 itself: the pages' redirect to the login form is no answer for
        # a client.
        return login_not_required(super().as_view(**initkwargs))

    @property
    def user(self) -> User:
        user = self.request.user
        if not isinstance(user, User):
            raise exceptions.NotAuthenticated()
        return user

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        token = getattr(request, "_auth", None)
        if isinstance(token, ApiToken) and request.method not in SAFE_METHODS:
            services.api_action_log(
                token=token,
                action=self.actions.get(str(request.method), "request"),
                method=str(request.method),
                path=request.path,
                status=response.status_code,
                tenant=self.audit_tenant,
                replayed=self.replayed,
            )
        return response

    def idempotent(self, request: Request, handler: Callable[[], Response]) -> Response:
        """Run `handler` once per Idempotency-Key: a retry with the same key (same user, same
        endpoint, same content) gets the first response and starts nothing; the same key
        with other content is refused (422)."""
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return handler()
        if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
            raise ApiError(
                400,
                "idempotency_key_invalid",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
                {"Idempotency-Key": ["1 to 255 printable ASCII characters"]},
            )
        endpoint = f"{request.method} {request.path}"[:255]
        fingerprint = _fingerprint(request)
        user = self.user
        stored = False
        try:
            with transaction.atomic():
                record = services.idempotency_claim(user=user, key=key, endpoint=endpoint)
                if record is not None:
                    return self._replay(
                        record.fingerprint, fingerprint, record.status_code, record.response
                    )
                try:
                    with transaction.atomic():
                        response = handler()
                except Exception as exc:  # answered like any error, and kept for the retry
                    response = self.handle_exception(exc)
                if response.status_code < 500:
                    stored = True
                    services.idempotency_store(
                        user=user,
                        key=key,
                        endpoint=endpoint,
                        fingerprint=fingerprint,
                        status_code=response.status_code,
                        response=json.loads(json.dumps(response.data, cls=DjangoJSONEncoder)),
                    )
                return response
        except IntegrityError:
            if not stored:
                raise
        # A concurrent request with the same key committed first: its response is the answer
        # (ours, and all it started, was rolled back). Read in a transaction of its own: the
        # claim locks the row, which PostgreSQL allows only inside one.
        with transaction.atomic():
            record = services.idempotency_claim(user=user, key=key, endpoint=endpoint)
        if record is None:
            raise ApiError(409, "idempotency_conflict", "retry the request")
        return self._replay(record.fingerprint, fingerprint, record.status_code, record.response)

    def _replay(self, stored: str, wanted: str, status_code: int, body: Any) -> Response:
        if stored != wanted:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request",
                {"Idempotency-Key": ["already used for another request"]},
            )
        self.replayed = True
        return Response(body, status=status_code, headers={"Idempotent-Replayed": "true"})


def _fingerprint(request: Request) -> str:
    """SHA-256 over a request's content (uploaded files by their bytes)."""
    digest = hashlib.sha256()
    data = request.data
    items: list[tuple[str, Any]]
    if hasattr(data, "lists"):
        items = [(k, v) for k, values in data.lists() for v in values]
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        items = [("", data)]
    for name, value in sorted(items, key=lambda kv: kv[0]):
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
        if isinstance(value, UploadedFile):
            for chunk in value.chunks():
                digest.update(chunk)
            value.seek(0)
        else:
            digest.update(
                json.dumps(value, sort_keys=True, default=str).encode("utf-8", "surrogatepass")
            )
        digest.update(b"\0")
    return digest.hexdigest()

"""Error pages in the site's style (and JSON under /api/): 400, 403, 404, 405, 500 and a
refused CSRF token. Never Django's debug pages: `make run` serves with DEBUG off too."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template import loader

from updates.api.errors import error_body

API_PREFIX = "/api/"


def _page(
    request: HttpRequest,
    status: int,
    title: str,
    explanation: str,
    *,
    code: str,
    allowed: list[str] | None = None,
) -> HttpResponse:
    if request.path.startswith(API_PREFIX):
        return JsonResponse(error_body(code, explanation), status=status)
    context = {"status": status, "title": title, "explanation": explanation, "allowed": allowed}
    return render(request, "errors/page.html", context, status=status)


def _plain(
    request: HttpRequest, status: int, title: str, explanation: str, code: str
) -> HttpResponse:
    """A page that needs nothing of the request (no user, no session, no database): for
    requests refused before the middleware ran, and for errors that may happen again."""
    if request.path.startswith(API_PREFIX):
        return JsonResponse(error_body(code, explanation), status=status)
    context = {"status": status, "title": title, "explanation": explanation}
    return HttpResponse(loader.get_template("errors/plain.html").render(context), status=status)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """A request Django cannot trust (a Host header not allowed, a malformed one)."""
    return _plain(
        request, 400, "Bad request", "The request could not be understood.", "bad_request"
    )


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _page(
        request,
        403,
        "Not allowed",
        "Your role does not allow this. An operator or an administrator can do it, or give "
        "you the role that can.",
        code="permission_denied",
    )


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _page(
        request,
        404,
        "Not found",
        "There is nothing here, or nothing you may see: it may have been deleted, or belong "
        "to another tenant.",
        code="not_found",
    )


def server_error(request: HttpRequest) -> HttpResponse:
    return _plain(
        request,
        500,
        "Something went wrong",
        "The dashboard could not answer this request; the error is in the server's log.",
        "server_error",
    )


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    return _page(
        request,
        403,
        "The form expired",
        "The page this form came from is too old, or cookies are blocked, so the request was "
        "refused and nothing was changed. Reload the page and try again.",
        code="csrf_failed",
    )


class MethodNotAllowedPage:
    """A 405 that a view answered with no body (`require_POST` and the like) gets the
    site's page, naming the methods the address answers."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code != 405 or response.content:
            return response
        allowed = [m.strip() for m in response.get("Allow", "").split(",") if m.strip()]
        page = _page(
            request,
            405,
            "Not this way",
            f"This address does not answer {request.method}.",
            code="method_not_allowed",
            allowed=allowed,
        )
        if allowed:
            page["Allow"] = ", ".join(allowed)
        return page

"""HTMX helpers shared by every app's views."""

from __future__ import annotations

from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def partial_template(request: HtmxHttpRequest, template: str, partial: str) -> str:
    """Full page normally; only the named partial for an HTMX request."""
    return f"{template}#{partial}" if request.htmx else template

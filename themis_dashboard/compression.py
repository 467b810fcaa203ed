"""Gzip for pages and API answers, and for nothing else."""

from __future__ import annotations

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.gzip import GZipMiddleware

# Media types worth compressing: what the dashboard renders and the API answers.
COMPRESSED_TYPES = frozenset({"text/html", "application/json"})


class PageGZipMiddleware(GZipMiddleware):
    """Django's GZipMiddleware, kept off streamed responses: an agent's bundle download
    is already compressed, and it is served in byte ranges (206, Content-Length) that
    gzip would break; an event stream must reach the browser as it is written.

    BREACH: the only secret a page repeats is the CSRF token, which Django masks afresh
    in every response, and GZipMiddleware pads every gzip'd body with up to 100 random
    bytes (Heal The Breach). An API token is shown once, in the answer to a
    CSRF-protected POST that an attacker cannot make the browser repeat. So no page is
    left out."""

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        media_type = response.get("Content-Type", "").split(";")[0].strip().lower()
        if response.streaming or media_type not in COMPRESSED_TYPES:
            return response
        compressed: HttpResponseBase = super().process_response(request, response)
        return compressed

"""The API's error shape, shared by its views and the site's error handlers (which answer
JSON under /api/): {"code", "message"} and "fields" for invalid input."""

from __future__ import annotations

from typing import Any


def error_body(
    code: str, message: str, fields: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return body

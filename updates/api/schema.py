"""How the OpenAPI schema describes the token authentication (drf-spectacular finds this
extension once it is imported: the app's ready() does)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "updates.api.views.access.TokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "an API token from the profile page: Authorization: Bearer thm_…",
        }


# Any operation that reads a body may answer 415 (a body sent without a Content-Type, or in one
# its parsers do not read): DRF decides that before the view runs, so no view declares it.
BODY_METHODS = frozenset({"post", "put", "patch"})


def document_unsupported_media_type(result: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: adds the 415 answer, with the API's error body, to
    every operation that takes a request body."""
    error = {"$ref": "#/components/schemas/Error"}
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if method in BODY_METHODS and "requestBody" in operation:
                operation["responses"].setdefault(
                    "415",
                    {
                        "content": {"application/json": {"schema": error}},
                        "description": "the body's media type is not one this operation reads",
                    },
                )
    return result

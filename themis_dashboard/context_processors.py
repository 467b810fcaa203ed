from typing import Any

from django.http import HttpRequest


def roles(request: HttpRequest) -> dict[str, Any]:
    user = request.user
    if not user.is_authenticated:
        return {"role_names": []}
    return {"role_names": sorted(g.name for g in user.groups.all())}

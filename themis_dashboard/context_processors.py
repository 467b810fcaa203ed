"""What every page's header needs: the user's roles and how many items wait on them."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.http import HttpRequest

from tenants.roles import TENANT_ADMIN
from updates.notifications.selectors import inbox_count


class _InboxBadge:
    """Counted when the header first shows it, once per page (an HTMX partial that does not
    extend the base page never asks)."""

    def __init__(self, user: Any, role_names: list[str]) -> None:
        self._user = user
        self._tenant_admin = TENANT_ADMIN in role_names

    @cached_property
    def count(self) -> int:
        return inbox_count(self._user, tenant_admin=self._tenant_admin)


def roles(request: HttpRequest) -> dict[str, Any]:
    user = request.user
    if not user.is_authenticated:
        return {"role_names": []}
    names = sorted(g.name for g in user.groups.all())
    # "operator · operator" says nothing: a role named like the user is not repeated.
    shown = [name for name in names if name.casefold() != user.get_username().casefold()]
    return {"role_names": shown, "inbox": _InboxBadge(user, names)}

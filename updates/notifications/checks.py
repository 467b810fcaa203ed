"""Start-up checks for the notification settings (bad values fail loudly)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, register


@register()
def notification_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    errors = []
    for name in ("THEMIS_DASHBOARD_URL", "THEMIS_PAGERDUTY_EVENTS_URL"):
        parts = urlsplit(getattr(settings, name))
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            errors.append(Error(f"{name} must be an http(s) URL", id="notifications.E001"))
    if settings.THEMIS_NOTIFY_BACKOFF_MAX_MS < settings.THEMIS_NOTIFY_BACKOFF_BASE_MS:
        errors.append(
            Error(
                "THEMIS_NOTIFY_BACKOFF_MAX_MS must be at least THEMIS_NOTIFY_BACKOFF_BASE_MS",
                id="notifications.E002",
            )
        )
    return errors

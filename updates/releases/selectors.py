"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet

from updates.models import Release, ReleaseFile
from updates.releases.deltas import deltas_in_progress, percent_saved


def releases_for_user(user: Any) -> QuerySet[Release]:
    # Releases are fleet-wide artefacts, readable by every signed-in role.
    return Release.objects.select_related("published_by").order_by("-created_at")


def release_rows_for_user(user: Any) -> list[Release]:
    """The releases page: each release with `deltas` (its delta bundles, each
    with `percent_saved`) and `deltas_generating` (a delta run is under way)."""

    deltas = ReleaseFile.objects.filter(kind=ReleaseFile.Kind.DELTA).order_by("-created_at")
    releases = list(
        releases_for_user(user).prefetch_related(Prefetch("files", deltas, to_attr="deltas"))
    )
    generating = deltas_in_progress([r.pk for r in releases]) if releases else set()
    for release in releases:
        release.deltas_generating = release.pk in generating  # type: ignore[attr-defined]
        for delta in release.deltas:  # type: ignore[attr-defined]
            delta.percent_saved = percent_saved(delta.size, release.size)
    return releases

"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Prefetch, QuerySet

from updates.models import Release, ReleaseFile
from updates.releases.deltas import deltas_in_progress, percent_saved


def releases_for_user(user: Any) -> QuerySet[Release]:
    # Releases are fleet-wide artefacts, readable by every signed-in role.
    return Release.objects.select_related("published_by").order_by("-created_at")


@dataclass(frozen=True)
class DeltaRow:
    file: ReleaseFile
    percent_saved: int


@dataclass(frozen=True)
class ReleaseRow:
    """One line of the releases page: the release, its delta bundles (newest first) and
    whether a delta run is under way."""

    release: Release
    deltas: list[DeltaRow]
    deltas_generating: bool


def release_rows_for_user(user: Any) -> list[ReleaseRow]:
    deltas = ReleaseFile.objects.filter(kind=ReleaseFile.Kind.DELTA).order_by("-created_at")
    releases = list(
        releases_for_user(user).prefetch_related(Prefetch("files", deltas, to_attr="delta_files"))
    )
    generating = deltas_in_progress([r.pk for r in releases]) if releases else set()
    return [
        ReleaseRow(
            release=release,
            deltas=[
                DeltaRow(file=delta, percent_saved=percent_saved(delta.size, release.size))
                for delta in getattr(release, "delta_files", [])
            ],
            deltas_generating=release.pk in generating,
        )
        for release in releases
    ]

"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Count, Prefetch, Q, QuerySet

from updates.models import ManifestUnreadable, Release, ReleaseFeed, ReleaseFeedItem, ReleaseFile
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
    # What the release's manifest says of other components (`themis-storage >=1.4`).
    dependencies: list[str] = field(default_factory=list)


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
            dependencies=_dependency_labels(release),
        )
        for release in releases
    ]


def _dependency_labels(release: Release) -> list[str]:
    try:
        return [dependency.describe() for dependency in release.dependencies]
    except ManifestUnreadable:
        return ["(its dependencies cannot be read: no update plan uses it)"]


@dataclass(frozen=True)
class FeedRow:
    """One line of the release feeds page: the feed, what it offered lately and what became
    of it, and its state in a word."""

    feed: ReleaseFeed
    items: list[ReleaseFeedItem]
    imported: int
    rejected: int
    state: str  # disabled | never polled | failing | rate limited | ok
    rate_exhausted: bool


FEED_ITEMS_SHOWN = 10


def feed_rows(now: datetime) -> list[FeedRow]:
    """Every feed (operators only: the view checks), with its last few items."""
    recent = ReleaseFeedItem.objects.select_related("release").order_by("-created_at", "-id")
    feeds = ReleaseFeed.objects.annotate(
        imported_count=Count("items", filter=Q(items__outcome=ReleaseFeedItem.Outcome.IMPORTED)),
        rejected_count=Count("items", filter=Q(items__outcome=ReleaseFeedItem.Outcome.REJECTED)),
    ).prefetch_related(Prefetch("items", recent[:FEED_ITEMS_SHOWN], to_attr="recent_items"))
    return [
        FeedRow(
            feed=feed,
            items=list(getattr(feed, "recent_items", [])),
            imported=int(getattr(feed, "imported_count", 0)),
            rejected=int(getattr(feed, "rejected_count", 0)),
            state=_feed_state(feed, now),
            rate_exhausted=_rate_exhausted(feed, now),
        )
        for feed in feeds
    ]


def _rate_exhausted(feed: ReleaseFeed, now: datetime) -> bool:
    reset = feed.rate_limit_reset_at
    return feed.rate_limit_remaining == 0 and reset is not None and reset > now


def _feed_state(feed: ReleaseFeed, now: datetime) -> str:
    if not feed.enabled:
        return "disabled"
    if feed.not_before is not None and feed.not_before > now:
        return "rate limited"
    if feed.consecutive_failures:
        return "failing"
    if feed.last_poll_at is None:
        return "never polled"
    return "ok"

"""Release feeds: sources the dashboard polls for new signed releases (docs/release-feeds.md).

The feed page's form creates and changes feeds (`feed_create`, `feed_update`, `feed_poll_soon`);
beat sends one poll task per feed that is due (`feeds_enqueue_due`); a poll (`feed_poll`) lists
what the source offers (conditionally: a 304 costs nothing), skips every version already known
without downloading it, and imports the rest through the upload's own service
(`services.release_import`: verified before stored, every import and rejection an Event).
Failures back off exponentially with jitter; a server's Retry-After and its rate limit's reset
are honoured (no poll before them). The clock, the sleep and the randomness are injected.

May call: the feed client, the release services, audit, the notifications' crypto (a feed's
token is kept as channel secrets are), models.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from updates.audit import event_log
from updates.models import Release, ReleaseFeed, ReleaseFeedItem
from updates.notifications.crypto import SecretUnreadable, decrypt_secrets, encrypt_secrets, mask
from updates.notifications.egress import EgressPolicy
from updates.releases.feed_client import (
    Backoff,
    FeedClient,
    FeedEntry,
    FeedError,
    FeedSource,
    Listing,
    RateLimit,
    backoff_seconds,
    note,
    server_wait_until,
)
from updates.releases.services import Expected, ReleaseRejected, release_import
from updates.taskqueue import TaskName, enqueue_on_commit, send_task

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Sleep = Callable[[float], None]
Rng = Callable[[], float]

# A poll holds its feed for its time (THEMIS_FEED_POLL_SECONDS) and this much more: a crashed
# poll frees it then.
POLL_LEASE_MARGIN = timedelta(minutes=10)
# A queued poll task keeps beat from queueing another one this long.
QUEUE_LEASE = timedelta(minutes=10)
# A broken download is tried this often within one poll, waiting at most INLINE_WAIT_MAX
# seconds in between; a longer wait ends the poll and the feed's backoff takes over.
DOWNLOAD_ATTEMPTS = 3
INLINE_WAIT_MAX = 10.0
ERROR_MAX = 500


@dataclass
class PollResult:
    """What one poll did (tests and the task's return value read it)."""

    status: str
    next_poll_at: datetime
    imported: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    skipped: int = 0
    downloads: int = 0
    ignored: list[str] = field(default_factory=list)
    error: str = ""


def _clip(text: str, limit: int = ERROR_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def feed_client(clock: Clock = timezone.now) -> FeedClient:
    """The real client, configured from settings."""
    return FeedClient(
        policy=EgressPolicy.from_setting(settings.THEMIS_FEED_EGRESS_ALLOW),
        allow_http=settings.THEMIS_FEED_ALLOW_HTTP,
        timeout=float(settings.THEMIS_FEED_TIMEOUT_SECONDS),
        clock=clock,
    )


def _backoff() -> Backoff:
    return Backoff(
        base=float(settings.THEMIS_FEED_BACKOFF_BASE_SECONDS),
        cap=float(settings.THEMIS_FEED_BACKOFF_MAX_SECONDS),
        max_wait=float(settings.THEMIS_FEED_MAX_WAIT_SECONDS),
    )


def _actor(feed: ReleaseFeed) -> str:
    return _clip(f"feed:{feed.name}", 150)


# ------------------------------------------------------------------ configuration


def _set_token(feed: ReleaseFeed, token: str) -> None:
    feed.token = encrypt_secrets({"token": token})
    feed.token_hint = mask(token)[:64]


def _audit(verb: str, feed: ReleaseFeed, user: Any, **extra: Any) -> None:
    # Never the token: only whether it changed.
    event_log(
        verb=verb,
        actor=user,
        obj=feed,
        details={
            "name": feed.name,
            "kind": feed.kind,
            "url": feed.url,
            "enabled": feed.enabled,
            "poll_interval_seconds": feed.poll_interval_seconds,
            **extra,
        },
    )


@transaction.atomic
def feed_create(
    *,
    name: str,
    kind: str,
    url: str,
    product: str,
    channel: str,
    enabled: bool,
    poll_interval_seconds: int,
    token: str,
    user: Any,
    clock: Clock = timezone.now,
) -> ReleaseFeed:
    feed = ReleaseFeed(
        name=name,
        kind=ReleaseFeed.Kind(kind),
        url=url,
        product=product,
        channel=channel,
        enabled=enabled,
        poll_interval_seconds=poll_interval_seconds,
        next_poll_at=clock() if enabled else None,
        created_by=user,
    )
    if token:
        _set_token(feed, token)
    feed.save()
    _audit("release_feed.created", feed, user, token_set=bool(token))
    return feed


@transaction.atomic
def feed_update(
    *,
    feed: ReleaseFeed,
    name: str,
    url: str,
    product: str,
    channel: str,
    enabled: bool,
    poll_interval_seconds: int,
    token: str,
    clear_token: bool,
    user: Any,
    clock: Clock = timezone.now,
) -> ReleaseFeed:
    """The kind is fixed once created. A token left empty keeps the stored one. A new URL
    or product forgets what the old one answered (ETag, Last-Modified, index hash)."""
    if url != feed.url or product != feed.product:
        feed.etag = feed.last_modified = feed.index_hash = ""
    token_changed = bool(token) or (clear_token and bool(feed.token))
    if token:
        _set_token(feed, token)
    elif clear_token:
        feed.token = feed.token_hint = ""
    if enabled and not feed.enabled:
        now = clock()
        feed.next_poll_at = max(now, feed.not_before) if feed.not_before else now
    feed.name, feed.url, feed.product, feed.channel = name, url, product, channel
    feed.enabled, feed.poll_interval_seconds = enabled, poll_interval_seconds
    feed.save()
    _audit("release_feed.updated", feed, user, token_changed=token_changed)
    return feed


def _not_queued(now: datetime) -> Q:
    return Q(queued_until__isnull=True) | Q(queued_until__lte=now)


def feed_poll_soon(*, feed: ReleaseFeed, user: Any, clock: Clock = timezone.now) -> datetime | None:
    """Poll the feed now, or once the server's wait is over. None when a poll is already
    queued or running, or the feed is disabled."""
    now = clock()
    at = max(now, feed.not_before) if feed.not_before else now
    with transaction.atomic():
        queued = ReleaseFeed.objects.filter(_not_queued(now), pk=feed.pk, enabled=True).update(
            next_poll_at=at, queued_until=at + QUEUE_LEASE
        )
        if not queued:
            return None
        _audit("release_feed.poll_requested", feed, user, at=at.isoformat())
        countdown = (at - now).total_seconds()
        enqueue_on_commit(TaskName.POLL_RELEASE_FEED, feed.pk, countdown=countdown or None)
    return at


def feeds_enqueue_due(*, clock: Clock = timezone.now, limit: int = 100) -> list[int]:
    """Beat: send one poll task per enabled feed that is due and has none queued."""
    now = clock()
    due = Q(next_poll_at__isnull=True) | Q(next_poll_at__lte=now)
    ids = list(
        ReleaseFeed.objects.filter(due, _not_queued(now), enabled=True)
        .order_by("next_poll_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    sent: list[int] = []
    for feed_id in ids:
        claimed = ReleaseFeed.objects.filter(_not_queued(now), pk=feed_id).update(
            queued_until=now + QUEUE_LEASE
        )
        if not claimed:
            continue
        try:
            send_task(TaskName.POLL_RELEASE_FEED, feed_id)
        except Exception:
            log.exception("could not queue the poll of release feed %s", feed_id)
            ReleaseFeed.objects.filter(pk=feed_id).update(queued_until=None)
            continue
        sent.append(feed_id)
    return sent


# ------------------------------------------------------------------ polling


def feed_poll(
    feed_id: int,
    *,
    client: FeedClient | None = None,
    clock: Clock = timezone.now,
    sleep: Sleep = time.sleep,
    rng: Rng = random.random,
) -> PollResult | None:
    """Poll one feed if it is enabled and due; None otherwise (another poll has it, or it is
    not time yet: a server's Retry-After or rate-limit reset included)."""
    now = clock()
    budget = float(settings.THEMIS_FEED_POLL_SECONDS)
    lease = now + timedelta(seconds=budget) + POLL_LEASE_MARGIN
    due = Q(next_poll_at__isnull=True) | Q(next_poll_at__lte=now)
    claimed = ReleaseFeed.objects.filter(due, pk=feed_id, enabled=True).update(
        next_poll_at=lease, queued_until=lease
    )
    if not claimed:
        return None
    # Wall time, not the injected clock: it bounds how long a worker is held.
    deadline = time.monotonic() + budget
    feed = ReleaseFeed.objects.get(pk=feed_id)
    client = client or feed_client(clock)
    try:
        source = _source(feed)
    except SecretUnreadable:
        error = FeedError(
            "the feed's token cannot be decrypted (SECRET_KEY changed?): enter it again",
            transient=False,
        )
        return _failed(feed, error, PollResult("", now), clock=clock, rng=rng)
    result = PollResult(status="", next_poll_at=now)
    listing: Listing | None = None
    try:
        listing = client.listing(source, deadline=deadline)
        result.ignored = list(listing.ignored)
        complete = True
        for entry in listing.entries:
            if _known(feed, entry):
                result.skipped += 1
                continue
            if (
                result.downloads >= settings.THEMIS_FEED_DOWNLOADS_PER_POLL
                or time.monotonic() >= deadline
            ):
                complete = False  # the rest next time, soon: the ETag is not kept meanwhile
                break
            result.downloads += 1
            _import(
                feed,
                source,
                entry,
                result,
                client=client,
                clock=clock,
                sleep=sleep,
                rng=rng,
                deadline=deadline,
            )
    except FeedError as err:
        return _failed(feed, err, result, clock=clock, rng=rng, listing=listing)
    except Exception as err:  # a server found a path we did not think of: a failed poll
        log.exception("release feed %s: unexpected error", feed.pk)
        unexpected = FeedError(f"unexpected error: {type(err).__name__}", transient=True)
        return _failed(feed, unexpected, result, clock=clock, rng=rng, listing=listing)
    return _succeeded(feed, source, listing, result, complete=complete, clock=clock)


def _source(feed: ReleaseFeed) -> FeedSource:
    token = decrypt_secrets(feed.token).get("token", "") if feed.token else ""
    return FeedSource(
        kind=feed.kind,
        url=feed.url,
        product=feed.product,
        token=token,
        etag=feed.etag,
        last_modified=feed.last_modified,
        index_hash=feed.index_hash,
    )


def _known(feed: ReleaseFeed, entry: FeedEntry) -> bool:
    """Already published (uploaded, or imported by any feed), or this very asset was seen
    before: skipped without a byte downloaded."""
    return (
        Release.objects.filter(product=feed.product, version=entry.version).exists()
        or ReleaseFeedItem.objects.filter(feed=feed, fingerprint=entry.fingerprint).exists()
    )


def _import(
    feed: ReleaseFeed,
    source: FeedSource,
    entry: FeedEntry,
    result: PollResult,
    *,
    client: FeedClient,
    clock: Clock,
    sleep: Sleep,
    rng: Rng,
    deadline: float,
) -> None:
    """Download one bundle into the upload's service; a transient break is retried a few
    times within the poll (and its time), then raised (the poll fails and backs off, nothing
    stored)."""
    expected = Expected(
        version=entry.version,
        size=entry.size,
        sha256=entry.sha256,
        manifest_sha256=entry.manifest_sha256,
    )
    origin = {
        "source": "feed",
        "feed_id": feed.pk,
        "feed": feed.name,
        "asset": entry.name,
        "url": _clip(entry.url),
    }
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        chunks = client.stream(source, entry, deadline=deadline)
        try:
            release = release_import(
                chunks=chunks,
                name=entry.name,
                channel=entry.channel or feed.channel,
                actor_label=_actor(feed),
                origin=origin,
                expected=expected,
            )
        except ReleaseRejected as rejected:
            _record(feed, entry, ReleaseFeedItem.Outcome.REJECTED, rejected=rejected)
            result.rejected.append(entry.version)
            if rejected.code != "ALREADY_PUBLISHED":  # a race with an upload: nothing wrong
                message = f"{entry.name} ({entry.version}) rejected ({rejected.code}): "
                _note_error(feed, note(message + rejected.message, ERROR_MAX), clock())
            return
        except FeedError as err:
            if not err.transient:  # refused by the guard, a 404...: this asset, not the feed
                _download_refused(feed, entry, err, origin, clock())
                result.rejected.append(entry.version)
                return
            wait = _inline_wait(err, attempt, clock=clock, rng=rng)
            last = attempt == DOWNLOAD_ATTEMPTS or err.out_of_time
            if last or wait is None or time.monotonic() + wait >= deadline:
                raise
            log.info("feed %s: %s; trying again in %.1f s", feed.pk, err.message, wait)
            sleep(wait)
            continue
        finally:
            chunks.close()
        _record(feed, entry, ReleaseFeedItem.Outcome.IMPORTED, release=release)
        result.imported.append(release.version)
        return


def _download_refused(
    feed: ReleaseFeed, entry: FeedEntry, err: FeedError, origin: dict[str, Any], at: datetime
) -> None:
    """An asset that cannot be fetched for good is a rejection like a bad bundle: recorded,
    logged, and not tried again until the feed offers it changed."""
    rejected = ReleaseRejected("DOWNLOAD_FAILED", note(err.message, ERROR_MAX))
    _record(feed, entry, ReleaseFeedItem.Outcome.REJECTED, rejected=rejected)
    event_log(
        verb="release.rejected",
        actor_label=_actor(feed),
        details={
            "file": entry.name,
            "code": rejected.code,
            "reason": rejected.message,
            "status": err.status,
            **origin,
        },
    )
    _note_error(feed, note(f"{entry.name} ({entry.version}): {rejected.message}", ERROR_MAX), at)


def _inline_wait(err: FeedError, attempt: int, *, clock: Clock, rng: Rng) -> float | None:
    """Seconds to wait before trying a download again within this poll; None when the
    server wants longer than a poll should sleep."""
    now = clock()
    wanted = server_wait_until(now, retry_at=err.retry_at, rate=err.rate, max_wait=1e9)
    if wanted is not None:
        seconds = (wanted - now).total_seconds()
        return seconds if seconds <= INLINE_WAIT_MAX else None
    if err.rate_limited:
        return None
    return backoff_seconds(attempt, Backoff(base=1.0, cap=INLINE_WAIT_MAX, max_wait=0), rng)


def _record(
    feed: ReleaseFeed,
    entry: FeedEntry,
    outcome: str,
    *,
    release: Release | None = None,
    rejected: ReleaseRejected | None = None,
) -> None:
    ReleaseFeedItem.objects.update_or_create(
        feed=feed,
        fingerprint=entry.fingerprint,
        defaults={
            "version": entry.version,
            "asset_name": _clip(entry.name, 255),
            "url": _clip(entry.url, 1000),
            "outcome": outcome,
            "release": release,
            "code": (rejected.code if rejected else "")[:32],
            "reason": note(rejected.message, ERROR_MAX) if rejected else "",
        },
    )


def _note_error(feed: ReleaseFeed, message: str, at: datetime) -> None:
    feed.last_error, feed.last_error_at = _clip(message), at
    ReleaseFeed.objects.filter(pk=feed.pk).update(
        last_error=feed.last_error, last_error_at=feed.last_error_at
    )


def _rate_fields(rate: RateLimit | None) -> dict[str, Any]:
    if rate is None or not rate.known:
        return {}
    return {
        "rate_limit_limit": rate.limit,
        "rate_limit_remaining": rate.remaining,
        "rate_limit_reset_at": rate.reset_at,
    }


def _summary(result: PollResult, listing: Listing | None) -> str:
    parts = [
        f"{len(result.imported)} imported",
        f"{len(result.rejected)} rejected",
        f"{result.skipped} known",
    ]
    if listing is not None and listing.incremental:
        parts.append("incremental answer")
    if result.ignored:
        parts.append(f"{len(result.ignored)} ignored (first: {result.ignored[0]})")
    return ", ".join(parts)


def _succeeded(
    feed: ReleaseFeed,
    source: FeedSource,
    listing: Listing,
    result: PollResult,
    *,
    complete: bool,
    clock: Clock,
) -> PollResult:
    now = clock()
    wait_until = server_wait_until(
        now, retry_at=None, rate=listing.rate, max_wait=_backoff().max_wait
    )
    # More to import than one poll may download: again at the next beat, not after the interval.
    next_poll = now + timedelta(seconds=feed.poll_interval_seconds) if complete else now
    if wait_until is not None and wait_until > next_poll:
        next_poll = wait_until
    if listing.not_modified:
        result.status = "not modified (304)"
    else:
        result.status = "200: " + _summary(result, listing) + ("" if complete else ", more to come")
    result.next_poll_at = next_poll
    fields: dict[str, Any] = {
        "last_poll_at": now,
        "last_success_at": now,
        "next_poll_at": next_poll,
        "not_before": wait_until,
        "queued_until": None,
        "consecutive_failures": 0,
        "last_status": _clip(result.status, 200),
        **_rate_fields(listing.rate),
    }
    sync: dict[str, Any] = {}
    if complete and not listing.not_modified:
        # Only once every entry is handled: a poll cut short asks for the whole list again.
        sync = {
            "etag": listing.etag,
            "last_modified": listing.last_modified,
            "index_hash": listing.index_hash,
        }
    _save_poll(feed, source, fields, sync)
    if feed.consecutive_failures:
        event_log(
            verb="release_feed.recovered",
            actor_label=_actor(feed),
            obj=feed,
            details={"feed": feed.name, "after_failures": feed.consecutive_failures},
        )
    return result


def _save_poll(
    feed: ReleaseFeed, source: FeedSource, fields: dict[str, Any], sync: dict[str, Any]
) -> None:
    # The sync state belongs to the URL it came from: an edit meanwhile drops it.
    if sync and ReleaseFeed.objects.filter(pk=feed.pk, url=source.url, kind=source.kind).update(
        **fields, **sync
    ):
        return
    ReleaseFeed.objects.filter(pk=feed.pk).update(**fields)


def _failed(
    feed: ReleaseFeed,
    err: FeedError,
    result: PollResult,
    *,
    clock: Clock,
    rng: Rng,
    listing: Listing | None = None,
) -> PollResult:
    now = clock()
    backoff = _backoff()
    failures = feed.consecutive_failures + 1
    delay = backoff_seconds(failures, backoff, rng)
    if not err.transient:  # a wrong URL or token: no hurry, but not forgotten either
        delay = max(delay, float(feed.poll_interval_seconds))
    next_poll = now + timedelta(seconds=delay)
    rate = err.rate if err.rate is not None and err.rate.known else None
    if rate is None and listing is not None:
        rate = listing.rate
    wait_until = server_wait_until(now, retry_at=err.retry_at, rate=rate, max_wait=backoff.max_wait)
    if wait_until is not None and wait_until > next_poll:
        next_poll = wait_until
    if err.rate_limited:
        head = f"rate limited (HTTP {err.status})"
    else:
        head = f"failed (HTTP {err.status})" if err.status else "failed"
    done = result.imported or result.rejected
    result.status = head + (f" after {_summary(result, listing)}" if done else "")
    result.error = note(err.message, ERROR_MAX)
    result.next_poll_at = next_poll
    resync = {"etag": "", "last_modified": "", "index_hash": ""} if err.resync else {}
    ReleaseFeed.objects.filter(pk=feed.pk).update(
        **resync,
        last_poll_at=now,
        next_poll_at=next_poll,
        not_before=wait_until,
        queued_until=None,
        consecutive_failures=failures,
        last_status=_clip(result.status, 200),
        last_error=result.error,
        last_error_at=now,
        **_rate_fields(rate),
    )
    log.warning("release feed %s (%s): %s", feed.pk, feed.name, result.error)
    if failures == 1:
        event_log(
            verb="release_feed.failing",
            actor_label=_actor(feed),
            obj=feed,
            details={"feed": feed.name, "error": result.error, "status": err.status},
        )
    return result

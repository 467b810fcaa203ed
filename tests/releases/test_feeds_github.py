"""Release feeds from a GitHub-Releases-style API, against a real fake GitHub on 127.0.0.1:
imports verified like uploads, conditional requests, rate limits, backoff, broken downloads."""

from __future__ import annotations

import email.utils
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from pytest_django.fixtures import Settings

from tests.helpers import MakeBundle, publish_bundle
from tests.releases.conftest import queued_parts_marker, stored_files
from tests.releases.feed_servers import Clock, FakeGitHub, Sleeper
from updates.engine.devpki import Pki
from updates.models import Event, Release, ReleaseFeed, ReleaseFeedItem
from updates.releases import feeds
from updates.releases.feeds import PollResult

pytestmark = pytest.mark.django_db

TOKEN = "ghp_0123456789abcdefSECRETtoken"


@pytest.fixture(autouse=True)
def _feed_settings(settings: Settings, trusted: Pki) -> None:
    settings.THEMIS_FEED_ALLOW_HTTP = True
    settings.THEMIS_FEED_EGRESS_ALLOW = ["127.0.0.1"]
    settings.THEMIS_FEED_TIMEOUT_SECONDS = 5
    settings.THEMIS_FEED_BACKOFF_BASE_SECONDS = 60
    settings.THEMIS_FEED_BACKOFF_MAX_SECONDS = 3600
    settings.THEMIS_FEED_MAX_WAIT_SECONDS = 86400


def make_feed(github: FakeGitHub, clock: Clock, *, token: str = TOKEN) -> ReleaseFeed:
    return feeds.feed_create(
        name="upstream",
        kind="github",
        url=github.releases_url,
        product="themisdb",
        channel="stable",
        enabled=True,
        poll_interval_seconds=900,
        token=token,
        user=None,
        clock=clock,
    )


def poll(feed: ReleaseFeed, clock: Clock, sleeper: Sleeper, jitter: float = 0.5) -> PollResult:
    result = feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper, rng=lambda: jitter)
    assert result is not None, "the feed was not due"
    feed.refresh_from_db()
    return result


def list_requests(github: FakeGitHub) -> int:
    return len(github.paths("/repos/"))


def test_a_signed_release_is_imported_like_an_upload(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("1.7.0")
    github.add("v1.7.0", {"themisdb-1.7.0.tar": bundle.read_bytes(), "SHA256SUMS": b"x"})
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.0"] and result.rejected == []
    release = Release.objects.get(version="1.7.0")
    assert release.channel == "stable" and release.published_by is None
    assert release.artifact.name is not None
    assert (Path(settings.MEDIA_ROOT) / release.artifact.name).read_bytes() == bundle.read_bytes()
    # The bundle, and (as for an upload) the marker of its queued parts extraction.
    assert stored_files() == sorted([release.artifact.name, queued_parts_marker(release)])
    event = Event.objects.get(verb="release.published")
    assert event.object_id == str(release.pk)
    assert event.details["source"] == "feed" and event.details["feed_id"] == feed.pk
    assert event.actor_label == "feed:upstream"
    item = ReleaseFeedItem.objects.get(feed=feed)
    assert (item.outcome, item.release, item.asset_name) == (
        "imported",
        release,
        "themisdb-1.7.0.tar",
    )
    # What the poll learnt: sync state, the server's rate limit, when to come back.
    assert feed.etag.startswith('W/"') and feed.last_modified == github.last_modified
    assert (feed.rate_limit_limit, feed.rate_limit_remaining) == (60, 59)
    assert feed.rate_limit_reset_at is not None
    assert int(feed.rate_limit_reset_at.timestamp()) == github.reset
    assert feed.last_poll_at == clock.now and feed.consecutive_failures == 0
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)
    assert feed.last_status.startswith("200: 1 imported")
    # The token went to the API only: not to the object server on another origin.
    listed = [s for s in github.seen if s.path.startswith("/repos/")]
    assert listed[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert listed[0].headers["Accept"] == "application/vnd.github+json"
    assert github.objects.seen and all(
        "Authorization" not in s.headers for s in github.objects.seen
    )
    assert not sleeper.calls


def test_a_304_costs_nothing(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    feed = make_feed(github, clock)
    poll(feed, clock, sleeper)
    etag, remaining, events = feed.etag, github.remaining, Event.objects.count()
    downloads = github.downloads("themisdb-1.7.0.tar")

    clock.advance(900)
    result = poll(feed, clock, sleeper)

    assert result.status == "not modified (304)"
    last = github.seen[-1]
    assert last.headers["If-None-Match"] == etag
    assert last.headers["If-Modified-Since"] == github.last_modified
    assert github.remaining == remaining  # the server's counter did not move
    assert github.downloads("themisdb-1.7.0.tar") == downloads  # nothing downloaded
    assert Release.objects.count() == 1 and ReleaseFeedItem.objects.count() == 1
    assert Event.objects.count() == events
    assert feed.etag == etag and feed.consecutive_failures == 0
    assert feed.rate_limit_remaining == remaining
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)


def test_a_known_version_is_skipped_without_downloading(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("1.7.0")
    publish_bundle(bundle, "1.7.0")  # uploaded by hand earlier
    github.add("v1.7.0", {"themisdb-1.7.0.tar": bundle.read_bytes()})
    github.add("v1.8.0-draft", {"themisdb-1.8.0.tar": b"draft"}, draft=True)
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert (result.skipped, result.downloads, result.imported) == (1, 0, [])
    assert not github.objects.seen and not github.paths(f"/{github.owner}/")
    assert feed.etag  # everything handled: the next poll is conditional


def test_prereleases_are_imported_to_beta_oldest_first(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.add(
        "v1.8.0-rc.1",
        {"themisdb-1.8.0-rc.1.tar": make_bundle("1.8.0-rc.1").read_bytes()},
        prerelease=True,
    )
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.0", "1.8.0-rc.1"]
    assert Release.objects.get(version="1.8.0-rc.1").channel == "beta"
    assert Release.objects.get(version="1.7.0").channel == "stable"


@pytest.mark.parametrize(
    ("variant", "code"),
    [("tampered", "MANIFEST_INVALID"), ("rogue", "SIGNATURE_INVALID"), ("unsigned", "")],
)
def test_a_bad_bundle_is_refused_logged_and_nothing_stored(
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    trusted: Pki,
    variant: str,
    code: str,
) -> None:
    if variant == "tampered":
        data = bytearray(make_bundle("1.7.0").read_bytes())
        data[data.index(b"echo 1.7.0")] ^= 0x01
        payload = bytes(data)
    elif variant == "rogue":
        bundle = make_bundle("1.7.0", signer=trusted.rogue_leaf, chain=trusted.rogue_chain)
        payload = bundle.read_bytes()
    else:
        payload = b"a tar file nobody signed" * 100
    github.add("v1.7.0", {"themisdb-1.7.0.tar": payload})
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == ["1.7.0"] and result.imported == []
    assert not Release.objects.exists()
    assert stored_files() == []  # not even a temp file
    event = Event.objects.get(verb="release.rejected")
    assert event.details["feed_id"] == feed.pk and event.details["file"] == "themisdb-1.7.0.tar"
    assert code in event.details["code"]
    assert "rejected (" in feed.last_error and feed.last_error_at == clock.now
    item = ReleaseFeedItem.objects.get(feed=feed)
    assert (
        item.outcome == "rejected" and item.release is None and item.code == event.details["code"]
    )
    # The poll itself worked: no failure, no backoff.
    assert feed.consecutive_failures == 0
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)


def test_a_rejected_asset_is_not_downloaded_again_until_it_changes(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": b"garbage" * 100})
    feed = make_feed(github, clock)
    poll(feed, clock, sleeper)
    github.add("v1.7.1", {"themisdb-1.7.1.tar": make_bundle("1.7.1").read_bytes()})

    clock.advance(900)
    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.1"] and result.skipped == 1
    assert github.downloads("themisdb-1.7.0.tar") == 1
    # Fixed upstream (a new upload of the asset): tried again.
    fixed = github.asset("themisdb-1.7.0.tar")
    fixed.blob.data, fixed.updated_at = make_bundle("1.7.0").read_bytes(), "2026-12-01T00:00:00Z"
    clock.advance(900)
    assert poll(feed, clock, sleeper).imported == ["1.7.0"]


def test_rate_limit_exhausted_backs_off_until_the_reset(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.remaining = 0
    github.reset = int(clock.now.timestamp()) + 1800
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    reset = clock.now + timedelta(seconds=1800)
    assert result.status == "rate limited (HTTP 403)"
    assert "API rate limit exceeded" in result.error
    assert feed.consecutive_failures == 1 and feed.next_poll_at == reset
    assert feed.not_before == reset and feed.rate_limit_remaining == 0
    assert not Release.objects.exists()
    assert Event.objects.filter(verb="release_feed.failing", object_id=str(feed.pk)).count() == 1
    asked = list_requests(github)

    # Not a request before the reset, whatever beat does.
    for _ in range(5):
        clock.advance(300)
        assert feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper) is None
        assert feed.pk not in feeds.feeds_enqueue_due(clock=clock)
    assert list_requests(github) == asked

    clock.advance(300)  # the reset
    github.remaining, github.reset = 60, int(clock.now.timestamp()) + 3600
    result = poll(feed, clock, sleeper)
    assert result.imported == ["1.7.0"]
    assert feed.consecutive_failures == 0 and feed.not_before is None
    assert Event.objects.filter(verb="release_feed.recovered").count() == 1


def test_a_success_with_no_request_left_waits_for_the_reset(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    github.remaining = 1  # this poll uses the last one
    github.reset = int(clock.now.timestamp()) + 7200
    feed = make_feed(github, clock)

    poll(feed, clock, sleeper)

    assert feed.consecutive_failures == 0 and feed.rate_limit_remaining == 0
    assert feed.next_poll_at == clock.now + timedelta(seconds=7200)  # not the 900 s interval


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_with_retry_after_is_honoured(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, form: str
) -> None:
    later = clock.now + timedelta(seconds=600)
    value = "600" if form == "seconds" else email.utils.format_datetime(later, usegmt=True)
    github.script.append((429, {"Retry-After": value}, b'{"message": "slow down"}'))
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.status == "rate limited (HTTP 429)"
    assert feed.next_poll_at == later and feed.not_before == later
    assert feed.consecutive_failures == 1
    clock.advance(599)
    assert feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper) is None
    clock.advance(1)
    assert poll(feed, clock, sleeper).status.startswith("200")


def test_403_with_retry_after_is_a_secondary_rate_limit(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    body = json.dumps({"message": "You have exceeded a secondary rate limit."}).encode()
    github.script.append((403, {"Retry-After": "90"}, body))
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper, jitter=0.0)

    assert result.status == "rate limited (HTTP 403)"
    # Backoff alone (jitter 0) would be 30 s: the server's 90 s win.
    assert feed.next_poll_at == clock.now + timedelta(seconds=90)


def test_a_plain_403_is_an_error_not_a_rate_limit(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    github.script.append((403, {}, b'{"message": "Resource not accessible by integration"}'))
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.status == "failed (HTTP 403)"
    assert "Resource not accessible" in feed.last_error
    # Not transient: no sooner than the feed's own interval.
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)


def test_server_errors_back_off_exponentially_with_jitter(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, settings: Settings
) -> None:
    settings.THEMIS_FEED_BACKOFF_MAX_SECONDS = 400
    feed = make_feed(github, clock)
    waits = []
    for jitter in (0.5, 0.5, 0.5, 0.0, 1.0, 1.0):
        github.script.append((503, {}, b"upstream down"))
        result = poll(feed, clock, sleeper, jitter=jitter)
        assert result.status == "failed (HTTP 503)"
        assert feed.next_poll_at is not None
        waits.append((feed.next_poll_at - clock.now).total_seconds())
        clock.now = feed.next_poll_at
    # Steps 60, 120, 240, then capped at 400: half fixed, half jitter.
    assert waits == [45.0, 90.0, 180.0, 200.0, 400.0, 400.0]
    assert feed.consecutive_failures == 6
    assert Event.objects.filter(verb="release_feed.failing").count() == 1  # not one per poll
    assert not feed.etag


def test_an_unreachable_server_is_a_transient_failure(clock: Clock, sleeper: Sleeper) -> None:
    feed = feeds.feed_create(
        name="gone",
        kind="github",
        url="http://127.0.0.1:9/repos/a/b/releases",
        product="themisdb",
        channel="stable",
        enabled=True,
        poll_interval_seconds=900,
        token="",
        user=None,
        clock=clock,
    )
    result = poll(feed, clock, sleeper)
    assert result.status == "failed" and "127.0.0.1:9" in result.error
    assert feed.next_poll_at == clock.now + timedelta(seconds=45)


def test_a_connection_cut_mid_asset_is_retried_within_the_poll(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    data = make_bundle("1.7.0").read_bytes()
    github.add("v1.7.0", {"themisdb-1.7.0.tar": data})
    asset = github.asset("themisdb-1.7.0.tar")
    asset.blob.cut_after, asset.blob.cuts = len(data) // 2, 1
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.0"]
    assert github.downloads("themisdb-1.7.0.tar") == 2
    assert len(sleeper.calls) == 1 and 0.5 <= sleeper.calls[0] <= 1.0
    release = Release.objects.get()
    assert release.artifact.name is not None
    # The bundle, and (as for an upload) the marker of its queued parts extraction.
    assert stored_files() == sorted([release.artifact.name, queued_parts_marker(release)])


def test_a_connection_cut_every_time_fails_the_poll_with_nothing_stored(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    data = make_bundle("1.7.0").read_bytes()
    github.add("v1.7.0", {"themisdb-1.7.0.tar": data})
    asset = github.asset("themisdb-1.7.0.tar")
    asset.blob.cut_after, asset.blob.cuts = 1000, 99
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.status == "failed" and "themisdb-1.7.0.tar" in result.error
    assert github.downloads("themisdb-1.7.0.tar") == feeds.DOWNLOAD_ATTEMPTS
    assert len(sleeper.calls) == feeds.DOWNLOAD_ATTEMPTS - 1
    assert not Release.objects.exists() and not ReleaseFeedItem.objects.exists()
    assert stored_files() == []
    assert not Event.objects.filter(verb="release.rejected").exists()  # not the bundle's fault
    assert feed.consecutive_failures == 1
    # The list's ETag was not kept: the next poll asks for the whole list again.
    assert feed.etag == ""
    asset.blob.cuts = 0
    clock.now = feed.next_poll_at or clock.now
    result = poll(feed, clock, sleeper)
    assert (
        "If-None-Match" not in [s for s in github.seen if s.path.startswith("/repos/")][-1].headers
    )
    assert result.imported == ["1.7.0"]


def test_an_asset_larger_than_declared_is_refused(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.asset("themisdb-1.7.0.tar").size = 1000
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == ["1.7.0"]
    assert ReleaseFeedItem.objects.get().code == "SIZE_MISMATCH"
    assert stored_files() == []


def test_an_asset_over_the_size_cap_is_refused_without_a_download(
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    settings: Settings,
) -> None:
    settings.THEMIS_MAX_BUNDLE_BYTES = 1000
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == ["1.7.0"]
    assert ReleaseFeedItem.objects.get().code == "TOO_LARGE"
    assert not github.objects.seen
    assert Event.objects.get(verb="release.rejected").details["code"] == "TOO_LARGE"


def test_a_poll_downloads_a_bounded_number_and_comes_back_for_the_rest(
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    settings: Settings,
) -> None:
    settings.THEMIS_FEED_DOWNLOADS_PER_POLL = 1
    for version in ("1.7.0", "1.7.1"):
        github.add(f"v{version}", {f"themisdb-{version}.tar": make_bundle(version).read_bytes()})
    feed = make_feed(github, clock)

    assert poll(feed, clock, sleeper).imported == ["1.7.0"]
    assert feed.etag == "" and feed.next_poll_at == clock.now  # soon, and not conditional
    assert poll(feed, clock, sleeper).imported == ["1.7.1"]
    assert feed.etag


def test_hostile_release_lists_fail_or_are_ignored_never_raise(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    feed = make_feed(github, clock)
    weird = [
        {"tag_name": "v" + "9" * 500, "assets": []},
        {"tag_name": "v1.0.0", "assets": "nope"},
        {"tag_name": "v1.0.1", "assets": [{"name": "themisdb-1.0.1.tar", "size": -1}]},
        {
            "tag_name": "v1.0.2",
            "assets": [
                {
                    "name": "themisdb-1.0.2.tar",
                    "size": 10,
                    "browser_download_url": "file:///etc/passwd",
                }
            ],
        },
        ["not", "an", "object"],
    ]
    answers = [
        (200, {}, json.dumps(weird).encode()),
        (200, {}, b"<html>not json</html>"),
        (200, {}, b"[" * 100_000 + b"]" * 100_000),
        (200, {}, json.dumps({"message": "not a list"}).encode()),
        (200, {"X-RateLimit-Reset": "9" * 40, "Retry-After": "soon"}, b"[]"),
        (500, {"Retry-After": "-5"}, b"<script>alert(1)</script>"),
    ]
    statuses = []
    for answer in answers:
        github.script.append(answer)
        clock.now = max(clock.now, feed.next_poll_at or clock.now)
        result = poll(feed, clock, sleeper)
        assert result.imported == [] and result.downloads == 0
        statuses.append((result.status, result.error))
    assert statuses[0][0].startswith("200: 0 imported, 0 rejected, 0 known, 5 ignored")
    assert statuses[1] == ("failed", "the release list is not JSON")
    assert statuses[2] == ("failed", "the release list is not JSON")
    assert statuses[3] == ("failed", "the answer is not a GitHub release list")
    assert statuses[4][0].startswith("200") and feed.rate_limit_reset_at is None
    assert statuses[5][0] == "failed (HTTP 500)"
    assert not github.objects.seen
    assert not Release.objects.exists()


def test_the_beat_task_queues_due_feeds_once(
    github: FakeGitHub, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(feeds, "send_task", lambda name, *args, **_: sent.append((name, args)))
    due = make_feed(github, clock)
    later = make_feed(github, clock)
    ReleaseFeed.objects.filter(pk=later.pk).update(next_poll_at=clock.now + timedelta(hours=1))
    off = make_feed(github, clock)
    ReleaseFeed.objects.filter(pk=off.pk).update(enabled=False)

    from updates.releases.tasks import poll_release_feeds

    assert poll_release_feeds.apply().get() == [due.pk]
    assert poll_release_feeds.apply().get() == []  # queued already: not twice
    assert sent == [("workers.tasks.poll_release_feed", (due.pk,))]
    schedule = settings.CELERY_BEAT_SCHEDULE["poll-release-feeds"]
    assert schedule["task"] == poll_release_feeds.name


def test_the_poll_task_polls_one_feed(github: FakeGitHub, make_bundle: MakeBundle) -> None:
    from django.utils import timezone

    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    feed = make_feed(github, Clock())
    ReleaseFeed.objects.filter(pk=feed.pk).update(next_poll_at=timezone.now())

    from updates.releases.tasks import poll_release_feed

    status = poll_release_feed.apply(args=(feed.pk,)).get()
    assert status is not None and status.startswith("200: 1 imported")
    assert poll_release_feed.apply(args=(feed.pk,)).get() is None  # not due again


def test_a_server_dripping_bytes_is_cut_when_the_polls_time_is_up(
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    settings: Settings,
) -> None:
    settings.THEMIS_FEED_POLL_SECONDS = 1
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.asset("themisdb-1.7.0.tar").blob.drip = 0.05
    feed = make_feed(github, clock)

    started = time.monotonic()
    result = poll(feed, clock, sleeper)

    assert time.monotonic() - started < 5
    assert "time ran out while fetching themisdb-1.7.0.tar" in result.error
    assert sleeper.calls == []  # no retry: the poll's time is spent
    assert feed.consecutive_failures == 1 and feed.etag == ""
    assert not Release.objects.exists() and stored_files() == []


def test_an_asset_503_with_a_short_retry_after_is_waited_for_within_the_poll(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.objects.script.append((503, {"Retry-After": "3"}, b"busy"))
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.0"] and sleeper.calls == [3.0]


def test_an_asset_rate_limited_for_long_ends_the_poll_until_then(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.objects.script.append((429, {"Retry-After": "600"}, b""))
    feed = make_feed(github, clock)
    started = clock.now

    result = poll(feed, clock, sleeper)

    assert result.status == "rate limited (HTTP 429)" and sleeper.calls == []
    assert feed.next_poll_at == started + timedelta(seconds=600)
    assert feed.etag == "" and not Release.objects.exists()
    # The list's own rate limit is still what the page shows.
    assert feed.rate_limit_remaining == 59


def test_endless_redirects_are_given_up(github: FakeGitHub, clock: Clock, sleeper: Sleeper) -> None:
    for _ in range(6):
        github.script.append((302, {"Location": github.releases_url}, b""))
    feed = make_feed(github, clock)

    result = poll(feed, clock, sleeper)

    assert result.error == "more than 5 redirects"
    assert len(github.seen) == 6


def test_a_token_that_cannot_be_decrypted_fails_the_poll_and_says_so(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, settings: Settings
) -> None:
    settings.SECRET_KEY = "an-old-key-long-enough-to-be-a-django-secret-key-0123"
    feed = make_feed(github, clock)
    settings.SECRET_KEY = "the-new-key-long-enough-to-be-a-django-secret-key-4567"

    result = poll(feed, clock, sleeper)

    assert "token cannot be decrypted" in result.error
    assert not github.seen  # nothing sent without the token


def test_a_broker_that_is_down_leaves_the_feed_to_the_next_beat(
    github: FakeGitHub, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*_: object, **__: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(feeds, "send_task", down)
    feed = make_feed(github, clock)

    assert feeds.feeds_enqueue_due(clock=clock) == []
    feed.refresh_from_db()
    assert feed.queued_until is None  # not held: the next beat tries again

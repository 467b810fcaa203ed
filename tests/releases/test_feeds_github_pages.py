"""A GitHub release list of several pages, against the fake GitHub on 127.0.0.1: every page
is read (its `rel="next"` links, on the feed's own origin, at most MAX_PAGES), only the first
request is conditional, and a list that cannot be read whole imports nothing."""

from __future__ import annotations

import json
import time
from collections import deque
from datetime import timedelta
from types import SimpleNamespace

import pytest
from pytest_django.fixtures import Settings

from tests.helpers import MakeBundle
from tests.releases.feed_servers import Clock, FakeGitHub, ObjectServer, Sleeper
from updates.engine.devpki import Pki
from updates.models import Release, ReleaseFeed, ReleaseFeedItem
from updates.releases import feed_client, feeds
from updates.releases.feed_client import (
    MAX_ENTRIES,
    MAX_PAGES,
    PER_PAGE,
    FeedError,
    FeedSource,
    with_per_page,
)
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
    settings.THEMIS_FEED_DOWNLOADS_PER_POLL = 10


def make_feed(github: FakeGitHub, clock: Clock, per_page: int) -> ReleaseFeed:
    """A feed of the fake GitHub, which gives `per_page` releases a page at most."""
    github.max_per_page = per_page
    return feeds.feed_create(
        name="upstream",
        kind="github",
        url=github.releases_url,
        product="themisdb",
        channel="stable",
        enabled=True,
        poll_interval_seconds=900,
        token=TOKEN,
        user=None,
        clock=clock,
    )


def poll(feed: ReleaseFeed, clock: Clock, sleeper: Sleeper) -> PollResult:
    result = feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper, rng=lambda: 0.5)
    assert result is not None, "the feed was not due"
    feed.refresh_from_db()
    return result


def publish(github: FakeGitHub, make_bundle: MakeBundle, *versions: str) -> None:
    for version in versions:
        github.add(f"v{version}", {f"themisdb-{version}.tar": make_bundle(version).read_bytes()})


def list_headers(github: FakeGitHub) -> list[dict[str, str]]:
    paths = {
        f"/repos/{github.owner}/{github.repo}/releases",
        f"/repositories/{github.repo_id}/releases",
    }
    return [seen.headers for seen in github.seen if seen.path.split("?")[0] in paths]


def test_a_list_of_three_pages_is_read_whole_and_imported_oldest_first(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    publish(github, make_bundle, "1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0")
    feed = make_feed(github, clock, per_page=2)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]
    assert result.status.startswith("200: 5 imported, 0 rejected, 0 known")
    assert github.pages() == [1, 2, 3]
    first = f"/repos/{github.owner}/{github.repo}/releases?per_page={PER_PAGE}"
    assert github.seen[0].path == first
    # Pages 2 and 3 where GitHub's Link header said, with the token (the same origin).
    later = [s.path for s in github.seen if s.path.startswith("/repositories/")]
    assert later == [
        f"/repositories/{github.repo_id}/releases?per_page=2&page=2",
        f"/repositories/{github.repo_id}/releases?per_page=2&page=3",
    ]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for h in list_headers(github))
    # The first page's ETag stands for the list; the last answer's rate limit is kept.
    assert feed.etag == github.etag(github.page_body(1, 2))
    assert feed.rate_limit_remaining == 57 and github.remaining == 57
    assert Release.objects.count() == 5 and ReleaseFeedItem.objects.count() == 5
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)


def test_only_the_first_page_is_conditional_and_its_304_ends_the_poll(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    publish(github, make_bundle, "1.0.0", "1.1.0", "1.2.0")
    feed = make_feed(github, clock, per_page=2)
    poll(feed, clock, sleeper)
    etag = feed.etag

    clock.advance(900)
    assert poll(feed, clock, sleeper).status == "not modified (304)"
    assert github.pages() == [1, 2, 1]  # nothing after the 304
    assert list_headers(github)[-1]["If-None-Match"] == etag

    publish(github, make_bundle, "1.3.0")  # page 1 changes
    clock.advance(900)
    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.3.0"] and result.skipped == 3
    assert github.pages() == [1, 2, 1, 1, 2]
    first, second = list_headers(github)[-2:]
    assert first["If-None-Match"] == etag
    assert "If-None-Match" not in second and "If-Modified-Since" not in second
    assert feed.etag == github.etag(github.page_body(1, 2)) != etag
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        assert github.downloads(f"themisdb-{version}.tar") == 1


@pytest.mark.parametrize("other", ["another host", "another port", "not http"])
def test_a_next_link_off_the_feeds_origin_is_refused_and_named(
    github: FakeGitHub,
    object_server: ObjectServer,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    other: str,
) -> None:
    publish(github, make_bundle, "1.0.0", "1.1.0", "1.2.0")
    port = github.httpd.server_address[1]
    github.link_base = {
        "another host": f"http://localhost:{port}",
        "another port": object_server.base,
        "not http": "file://",
    }[other]
    feed = make_feed(github, clock, per_page=2)

    result = poll(feed, clock, sleeper)

    assert result.status == "failed"
    if other == "not http":
        assert result.error.startswith("the release list's link to page 2 is not an http(s) URL")
    else:
        assert result.error == (
            f"refused to follow the release list's link to page 2 on another origin,"
            f" {github.link_base} (the feed is on {github.base})"
        )
    # Nothing fetched from there (nor the page again from here), nothing of page 1 imported.
    assert github.pages() == [1] and not object_server.seen
    assert not Release.objects.exists() and not ReleaseFeedItem.objects.exists()
    assert feed.etag == "" and feed.last_error == result.error
    # Not a network hiccup: no sooner than the feed's interval.
    assert feed.consecutive_failures == 1
    assert feed.next_poll_at == clock.now + timedelta(seconds=900)


@pytest.mark.parametrize(
    ("answer", "status", "wait"),
    [
        ((503, {}, b"upstream down"), "failed (HTTP 503)", 45),
        (
            (429, {"Retry-After": "600"}, b'{"message": "slow down"}'),
            "rate limited (HTTP 429)",
            600,
        ),
    ],
)
def test_a_failure_on_page_two_keeps_the_etag_and_imports_nothing(
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    answer: tuple[int, dict[str, str], bytes],
    status: str,
    wait: int,
) -> None:
    publish(github, make_bundle, "1.0.0", "1.1.0", "1.2.0")
    feed = make_feed(github, clock, per_page=2)
    poll(feed, clock, sleeper)
    etag = feed.etag
    publish(github, make_bundle, "1.3.0")
    github.page_script[2] = deque([answer])

    clock.advance(900)
    result = poll(feed, clock, sleeper)

    assert result.status == status and "page 2 of the release list" in result.error
    assert github.pages()[-2:] == [1, 2]
    assert feed.etag == etag  # not the new page 1's: the next poll reads every page again
    assert github.downloads("themisdb-1.3.0.tar") == 0
    assert not Release.objects.filter(version="1.3.0").exists()
    assert feed.consecutive_failures == 1
    assert feed.next_poll_at == clock.now + timedelta(seconds=wait)

    clock.now = feed.next_poll_at
    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.3.0"] and result.skipped == 3
    assert feed.etag == github.etag(github.page_body(1, 2))
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        assert github.downloads(f"themisdb-{version}.tar") == 1
    assert Release.objects.count() == 4 and ReleaseFeedItem.objects.count() == 4


def test_a_first_poll_broken_on_page_two_imports_nothing_then_each_release_once(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    publish(github, make_bundle, "1.0.0", "1.1.0", "1.2.0")
    github.page_script[2] = deque([(200, {}, b"<html>maintenance</html>")])
    feed = make_feed(github, clock, per_page=2)

    result = poll(feed, clock, sleeper)

    assert (result.status, result.error) == ("failed", "page 2 of the release list is not JSON")
    assert not github.objects.seen and not Release.objects.exists() and feed.etag == ""

    clock.now = feed.next_poll_at or clock.now
    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.0.0", "1.1.0", "1.2.0"]
    assert [github.downloads(f"themisdb-{v}.tar") for v in ("1.0.0", "1.1.0", "1.2.0")] == [1] * 3


def test_at_most_max_pages_are_read(github: FakeGitHub, clock: Clock, sleeper: Sleeper) -> None:
    for minor in range(MAX_PAGES + 2):
        github.add(f"v1.{minor}.0", {"NOTES.md": b"notes only"})
    feed = make_feed(github, clock, per_page=1)

    result = poll(feed, clock, sleeper)

    assert github.pages() == list(range(1, MAX_PAGES + 1))
    assert result.ignored[-1] == f"releases after the first {MAX_PAGES} pages were not read"
    assert len(result.ignored) == MAX_PAGES + 1  # the releases read, none with a bundle
    assert result.status.startswith(
        f"200: 0 imported, 0 rejected, 0 known, {MAX_PAGES + 1} ignored"
    )
    assert feed.consecutive_failures == 0 and feed.etag == github.etag(github.page_body(1, 1))
    assert feed.rate_limit_remaining == 60 - MAX_PAGES


def test_a_next_link_back_to_a_page_already_read_is_refused(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    github.add("v1.0.0", {"NOTES.md": b"notes only"})
    github.add("v1.1.0", {"NOTES.md": b"notes only"})
    back = f'<{github.releases_url}?per_page={PER_PAGE}>; rel="next"'
    github.page_script[2] = deque([(200, {"Link": back}, b"[]")])
    feed = make_feed(github, clock, per_page=1)

    result = poll(feed, clock, sleeper)

    assert result.error.startswith("the release list's link to page 3 points back to a page")
    assert github.pages() == [1, 2]


def test_every_page_counts_against_the_polls_time(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper, settings: Settings
) -> None:
    settings.THEMIS_FEED_POLL_SECONDS = 1
    for minor in range(3):
        github.add(f"v1.{minor}.0", {"NOTES.md": b"notes only"})
    github.page_delay[2] = 1.5
    feed = make_feed(github, clock, per_page=1)

    started = time.monotonic()
    result = poll(feed, clock, sleeper)

    assert time.monotonic() - started < 4
    # Cut while page 2 was read, or before page 3 was asked for: never read past the time.
    assert result.error in {
        "the poll's time ran out while fetching page 2 of the release list",
        "the poll's time ran out before page 3 of the release list",
    }
    assert 3 not in github.pages()
    assert feed.consecutive_failures == 1 and feed.etag == ""


def test_at_most_max_entries_are_read_across_pages(
    github: FakeGitHub, clock: Clock, sleeper: Sleeper
) -> None:
    half = MAX_ENTRIES * 3 // 5
    api = f"{github.base}/repositories/{github.repo_id}/releases?per_page={half}"
    for page in (1, 2):
        body = json.dumps([{"tag_name": f"not a version {page}.{n}"} for n in range(half)])
        link = f'<{api}&page={page + 1}>; rel="next"'
        github.page_script[page] = deque([(200, {"Link": link}, body.encode())])
    feed = make_feed(github, clock, per_page=half)

    result = poll(feed, clock, sleeper)

    assert github.pages() == [1, 2]  # page 3 not asked for: the list is full
    assert len(result.ignored) == MAX_ENTRIES + 1
    assert result.ignored[MAX_ENTRIES - 1].startswith(f"release #{MAX_ENTRIES - 1}: tag")
    assert result.ignored[-1] == f"releases after the first {MAX_ENTRIES} were not read"
    assert feed.consecutive_failures == 0


def test_a_poll_whose_time_is_up_asks_for_no_further_page(
    github: FakeGitHub, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for minor in range(3):
        github.add(f"v1.{minor}.0", {"NOTES.md": b"notes only"})
    # The client's clock jumps past the deadline once page 1 is read (its watchdog's
    # timer is set from the first reading).
    readings: list[float] = []

    def monotonic() -> float:
        readings.append(time.monotonic())
        return readings[-1] + (0.0 if len(readings) == 1 else 3600.0)

    monkeypatch.setattr(feed_client, "time", SimpleNamespace(monotonic=monotonic))
    github.max_per_page = 1
    source = FeedSource(kind="github", url=github.releases_url, product="themisdb")

    with pytest.raises(FeedError) as raised:
        feeds.feed_client(clock).listing(source, deadline=time.monotonic() + 60)

    assert raised.value.message == "the poll's time ran out before page 2 of the release list"
    assert raised.value.out_of_time and raised.value.transient
    assert github.pages() == [1]


def test_the_list_is_asked_for_in_pages_of_per_page_releases() -> None:
    api = "https://api.github.com/repos/themis/themisdb/releases"
    assert with_per_page(api) == f"{api}?per_page={PER_PAGE}" and PER_PAGE == 100
    assert with_per_page(f"{api}?per_page=5") == f"{api}?per_page=5"  # its own wish kept
    assert with_per_page(f"{api}?x=1") == f"{api}?x=1&per_page={PER_PAGE}"

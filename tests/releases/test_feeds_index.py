"""Release feeds from a JSON index (docs/release-feeds.md), against a real index server on
127.0.0.1: full and incremental answers (manifest sync), what the index declares checked
before anything is stored, hostile answers."""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pytest_django.fixtures import Settings

from tests.helpers import MakeBundle
from tests.releases.conftest import stored_files
from tests.releases.feed_servers import Clock, FakeIndex, Sleeper
from updates.engine.devpki import Pki
from updates.models import Event, Release, ReleaseFeed, ReleaseFeedItem
from updates.releases import feed_client, feeds
from updates.releases.feeds import PollResult

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _feed_settings(settings: Settings, trusted: Pki) -> None:
    settings.THEMIS_FEED_ALLOW_HTTP = True
    settings.THEMIS_FEED_EGRESS_ALLOW = ["127.0.0.1"]
    settings.THEMIS_FEED_TIMEOUT_SECONDS = 5
    settings.THEMIS_FEED_BACKOFF_BASE_SECONDS = 60
    settings.THEMIS_FEED_BACKOFF_MAX_SECONDS = 3600


def make_feed(index: FakeIndex, clock: Clock, url: str | None = None) -> ReleaseFeed:
    return feeds.feed_create(
        name="mirror",
        kind="index",
        url=url or index.url,
        product="themisdb",
        channel="stable",
        enabled=True,
        poll_interval_seconds=600,
        token="",
        user=None,
        clock=clock,
    )


def poll(feed: ReleaseFeed, clock: Clock, sleeper: Sleeper) -> PollResult:
    result = feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper, rng=lambda: 0.5)
    assert result is not None
    feed.refresh_from_db()
    clock.now = max(clock.now, feed.next_poll_at or clock.now)
    return result


def manifest_of(bundle: Path) -> bytes:
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return member.read()


def entry_for(index: FakeIndex, bundle: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """An index entry for `bundle`, served as themisdb-`name`.tar."""
    return index.entry(name, bundle.read_bytes(), manifest_of(bundle), **overrides)


def index_requests(index: FakeIndex) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(s.path).query) for s in index.seen if s.path.startswith("/index")]


def test_a_full_then_an_incremental_answer(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    first = index_server.publish(
        entry_for(index_server, make_bundle("1.7.0"), "1.7.0"),
        entry_for(index_server, make_bundle("1.7.1"), "1.7.1", channel="hotfix"),
    )
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert result.imported == ["1.7.0", "1.7.1"]
    assert Release.objects.get(version="1.7.1").channel == "hotfix"
    assert feed.index_hash == first and feed.etag == f'"{first}"'
    assert index_requests(index_server)[-1] == {}  # nothing known yet: no `since`

    # Unchanged: a 304, nothing downloaded.
    assert poll(feed, clock, sleeper).status == "not modified (304)"
    assert index_requests(index_server)[-1] == {"since": [first]}
    assert index_server.seen[-1].headers["If-None-Match"] == f'"{first}"'

    second = index_server.publish(entry_for(index_server, make_bundle("1.8.0"), "1.8.0"))
    result = poll(feed, clock, sleeper)

    # Only the new entry came (manifest sync), and only it was downloaded.
    assert "incremental answer" in result.status
    assert (result.imported, result.skipped) == (["1.8.0"], 0)
    assert index_requests(index_server)[-1] == {"since": [first]}
    assert feed.index_hash == second
    assert index_server.downloads == {
        "themisdb-1.7.0.tar": 1,
        "themisdb-1.7.1.tar": 1,
        "themisdb-1.8.0.tar": 1,
    }
    assert Event.objects.filter(verb="release.published").count() == 3


def test_a_server_without_incremental_answers_sends_everything(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    index_server.incremental = False
    index_server.publish(entry_for(index_server, make_bundle("1.7.0"), "1.7.0"))
    feed = make_feed(index_server, clock)
    poll(feed, clock, sleeper)
    index_server.publish(entry_for(index_server, make_bundle("1.8.0"), "1.8.0"))

    result = poll(feed, clock, sleeper)

    assert "incremental" not in result.status
    assert (result.imported, result.skipped) == (["1.8.0"], 1)  # 1.7.0 known: not downloaded
    assert index_server.downloads["themisdb-1.7.0.tar"] == 1


def test_a_bare_list_is_a_full_index(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    entry = entry_for(index_server, make_bundle("1.7.0"), "1.7.0")
    body = json.dumps([entry]).encode()
    index_server.script.append((200, {"Content-Type": "application/json"}, body))
    feed = make_feed(index_server, clock)

    assert poll(feed, clock, sleeper).imported == ["1.7.0"]
    assert feed.index_hash == "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"sha256": "0" * 64}, "SHA256_MISMATCH"),
        ({"manifest_sha256": "1" * 64}, "MANIFEST_MISMATCH"),
        ({"version": "1.9.0"}, "VERSION_MISMATCH"),
        ({"size": 10}, "SIZE_MISMATCH"),
    ],
)
def test_what_the_index_declares_is_checked_before_anything_is_stored(
    index_server: FakeIndex,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
    override: dict[str, Any],
    code: str,
) -> None:
    index_server.publish(entry_for(index_server, make_bundle("1.7.0"), "1.7.0", **override))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == [override.get("version", "1.7.0")]
    assert not Release.objects.exists() and stored_files() == []
    assert ReleaseFeedItem.objects.get().code == code
    assert Event.objects.get(verb="release.rejected").details["code"] == code
    assert code in feed.last_error


def test_an_unsigned_bundle_in_the_index_is_refused(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper
) -> None:
    index_server.publish(index_server.entry("1.7.0", b"\x00" * 2048))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == ["1.7.0"] and stored_files() == []
    assert not Release.objects.exists()


def test_a_bundle_the_server_cannot_give_is_rejected_and_others_go_on(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    missing = {"version": "1.6.0", "url": "bundles/nope.tar", "sha256": "a" * 64, "size": 5}
    refused = {
        "version": "1.6.1",
        "url": "http://169.254.169.254/latest/meta-data",
        "sha256": "b" * 64,
        "size": 5,
    }
    index_server.publish(missing, refused, entry_for(index_server, make_bundle("1.7.0"), "1.7.0"))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert result.rejected == ["1.6.0", "1.6.1"] and result.imported == ["1.7.0"]
    codes = dict(ReleaseFeedItem.objects.values_list("version", "code"))
    assert codes == {"1.6.0": "DOWNLOAD_FAILED", "1.6.1": "DOWNLOAD_FAILED", "1.7.0": ""}
    reasons = dict(ReleaseFeedItem.objects.values_list("version", "reason"))
    assert "HTTP 404" in reasons["1.6.0"] and "link-local" in reasons["1.6.1"]
    assert feed.consecutive_failures == 0 and feed.index_hash  # the poll itself went through
    assert Event.objects.filter(verb="release.rejected").count() == 2


def test_redirects_are_followed_and_checked(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    entry = entry_for(index_server, make_bundle("1.7.0"), "1.7.0")
    moved = index_server.url.replace("/index.json", "/moved.json")
    index_server.script.append((301, {"Location": "/index.json"}, b""))
    index_server.publish(entry)
    feed = make_feed(index_server, clock, url=moved)

    assert poll(feed, clock, sleeper).imported == ["1.7.0"]
    # A redirect to a forbidden address is refused like a direct one.
    index_server.script.append((302, {"Location": "http://10.0.0.1/index.json"}, b""))
    feed.etag = ""
    feed.save()
    result = poll(feed, clock, sleeper)
    assert result.status == "failed" and "10.0.0.1" in result.error


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "not JSON"),
        (b'{"format": 2, "releases": []}', "index format"),
        (b'{"product": "otherdb", "releases": []}', "is for 'otherdb'"),
        (b'{"hash": "bad hash with spaces", "releases": []}', "hash is malformed"),
        (b'{"since": "h-never-sent", "releases": []}', "never asked about"),
        (b'{"releases": {"1.7.0": {}}}', "no list of releases"),
        (b'"just a string"', "not a release index"),
    ],
)
def test_hostile_indexes_fail_the_poll_without_raising(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, body: bytes, error: str
) -> None:
    index_server.script.append((200, {"ETag": '"x"'}, body))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert result.status == "failed" and error in result.error
    assert feed.consecutive_failures == 1 and feed.etag == ""
    assert feed.next_poll_at is not None and feed.last_poll_at is not None
    # Not transient: back after the feed's interval, not the 45 s of a first backoff.
    assert feed.next_poll_at - feed.last_poll_at == timedelta(seconds=600)


def test_odd_entries_are_left_out_with_a_note(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper
) -> None:
    odd: list[Any] = [
        "text",
        {"version": "../../etc", "url": "x", "sha256": "a" * 64, "size": 1},
        {"version": "1.0.0", "url": "javascript:alert(1)", "sha256": "a" * 64, "size": 1},
        {"version": "1.0.1", "url": "b.tar", "sha256": "xyz", "size": 1},
        {"version": "1.0.2", "url": "b.tar", "sha256": "a" * 64, "size": True},
        {"version": "1.0.3", "url": "b.tar", "sha256": "a" * 64, "size": 1, "channel": "x"},
        {"version": "1.0.4", "url": "b.tar", "sha256": "a" * 64, "size": 1, "manifest_sha256": 5},
    ]
    index_server.script.append((200, {}, json.dumps({"releases": odd}).encode()))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert len(result.ignored) == 7 and result.downloads == 0
    assert "7 ignored" in feed.last_status
    assert len(index_server.seen) == 1


def test_an_index_larger_than_the_cap_is_refused(
    index_server: FakeIndex,
    clock: Clock,
    sleeper: Sleeper,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_client, "LIST_MAX_BYTES", 1000)
    index_server.script.append((200, {}, b'{"releases": []' + b" " * 5000 + b"}"))
    feed = make_feed(index_server, clock)

    result = poll(feed, clock, sleeper)

    assert "larger than 1000 bytes" in result.error


def test_a_feed_edited_mid_poll_keeps_no_sync_state_of_the_old_url(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = make_feed(index_server, clock)
    real_listing = feed_client.FeedClient.listing

    def listing_then_edit(self: feed_client.FeedClient, source: Any, **kwargs: Any) -> Any:
        answer = real_listing(self, source, **kwargs)
        ReleaseFeed.objects.filter(pk=feed.pk).update(url=index_server.url + "?v=2")
        return answer

    monkeypatch.setattr(feed_client.FeedClient, "listing", listing_then_edit)
    result = poll(feed, clock, sleeper)

    assert result.status.startswith("200")
    assert feed.etag == "" and feed.index_hash == ""
    assert feed.next_poll_at is not None and feed.last_poll_at is not None
    assert feed.next_poll_at - feed.last_poll_at == timedelta(seconds=600)


def test_an_incremental_answer_after_another_state_makes_the_next_poll_start_afresh(
    index_server: FakeIndex, clock: Clock, sleeper: Sleeper, make_bundle: MakeBundle
) -> None:
    feed = make_feed(index_server, clock)
    ReleaseFeed.objects.filter(pk=feed.pk).update(index_hash="h-ours", etag='"h-ours"')
    confused = {"hash": "h2", "since": "h-theirs", "releases": []}
    index_server.script.append((200, {}, json.dumps(confused).encode()))

    result = poll(feed, clock, sleeper)

    assert "never asked about" in result.error
    assert index_requests(index_server)[-1] == {"since": ["h-ours"]}
    assert (feed.index_hash, feed.etag) == ("", "")
    index_server.publish(entry_for(index_server, make_bundle("1.7.0"), "1.7.0"))
    assert poll(feed, clock, sleeper).imported == ["1.7.0"]
    assert index_requests(index_server)[-1] == {}
    assert "If-None-Match" not in index_server.seen[-2].headers

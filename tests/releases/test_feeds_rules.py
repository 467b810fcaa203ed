"""The feed client's plain rules: rate-limit headers, Retry-After, backoff with jitter, the
server's wait; and its parsers, which take any JSON a server sends and raise nothing but
FeedError."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from updates.releases.feed_client import (
    Backoff,
    FeedError,
    RateLimit,
    backoff_seconds,
    note,
    parse_github,
    parse_index,
    rate_limit,
    retry_after,
    server_wait_until,
    with_since,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_rate_limit_headers_are_read_and_nonsense_ignored() -> None:
    reset = int((NOW + timedelta(minutes=5)).timestamp())
    rate = rate_limit(
        {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}
    )
    assert rate == RateLimit(limit=5000, remaining=0, reset_at=NOW + timedelta(minutes=5))
    for junk in ("-1", "1e3", "٣", "9" * 40, " ", "0x10"):
        odd = rate_limit({"X-RateLimit-Remaining": junk, "X-RateLimit-Reset": junk})
        assert odd.remaining is None and odd.reset_at is None
    assert not rate_limit({}).known


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert retry_after("120", NOW) == NOW + timedelta(seconds=120)
    date = email.utils.format_datetime(NOW + timedelta(hours=1), usegmt=True)
    assert retry_after(date, NOW) == NOW + timedelta(hours=1)
    for junk in (None, "", "-5", "soon", "Mon, 99 Foo 2026", "9" * 30):
        assert retry_after(junk, NOW) is None


def test_backoff_doubles_up_to_the_cap_with_half_of_it_jitter() -> None:
    backoff = Backoff(base=10, cap=100, max_wait=1000)
    assert [backoff_seconds(n, backoff, lambda: 0.0) for n in range(1, 6)] == [5, 10, 20, 40, 50]
    assert [backoff_seconds(n, backoff, lambda: 1.0) for n in range(1, 6)] == [10, 20, 40, 80, 100]
    assert backoff_seconds(10**6, backoff, lambda: 0.5) == 75
    assert backoff_seconds(0, backoff, lambda: 7.0) == 10  # odd inputs stay in bounds


def test_the_server_wait_is_retry_after_or_the_reset_when_nothing_is_left() -> None:
    reset = NOW + timedelta(minutes=30)
    spent = RateLimit(limit=60, remaining=0, reset_at=reset)
    left = RateLimit(limit=60, remaining=3, reset_at=reset)
    assert server_wait_until(NOW, retry_at=None, rate=spent, max_wait=86400) == reset
    assert server_wait_until(NOW, retry_at=None, rate=left, max_wait=86400) is None
    later = NOW + timedelta(hours=1)
    assert server_wait_until(NOW, retry_at=later, rate=spent, max_wait=86400) == later
    past = NOW - timedelta(minutes=1)
    assert server_wait_until(NOW, retry_at=past, rate=None, max_wait=86400) is None
    far = RateLimit(remaining=0, reset_at=NOW + timedelta(days=3650))
    capped = server_wait_until(NOW, retry_at=None, rate=far, max_wait=3600)
    assert capped == NOW + timedelta(hours=1)


def test_since_is_added_to_the_index_url() -> None:
    assert with_since("https://x/i.json", "") == "https://x/i.json"
    assert with_since("https://x/i.json", "h1") == "https://x/i.json?since=h1"
    assert with_since("https://x/i.json?a=b", "h/2") == "https://x/i.json?a=b&since=h%2F2"


def test_notes_are_printable_and_short() -> None:
    assert note("a\x00b\nc") == "a?b?c"
    assert len(note("x" * 1000)) == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)
release_like = st.fixed_dictionaries(
    {},
    optional={
        "tag_name": json_values | st.sampled_from(["v1.7.0", "1.7.0", "v", "../x"]),
        "draft": json_values,
        "prerelease": json_values,
        "assets": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": json_values | st.sampled_from(["themisdb-1.7.0.tar", "themisdb-.tar"]),
                    "size": json_values,
                    "browser_download_url": json_values
                    | st.sampled_from(["https://h/a.tar", "file:///x", "http://[::1"]),
                    "state": json_values,
                    "id": json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
    },
)
entry_like = st.fixed_dictionaries(
    {},
    optional={
        "version": json_values | st.just("1.7.0"),
        "url": json_values | st.sampled_from(["b.tar", "https://h/b.tar", "http://[::1"]),
        "sha256": json_values | st.just("a" * 64),
        "size": json_values | st.just(10),
        "manifest_sha256": json_values,
        "channel": json_values | st.just("beta"),
    },
)


@settings(max_examples=200, deadline=None)
@given(data=st.lists(release_like | json_values, max_size=5) | json_values)
def test_any_github_answer_parses_or_is_a_feed_error(data: Any) -> None:
    try:
        entries, notes = parse_github(data, product="themisdb")
    except FeedError:
        return
    for entry in entries:
        assert entry.url.startswith(("http://", "https://")) and entry.size is not None
        assert len(entry.fingerprint) == 64
    assert all(len(n) <= 200 for n in notes)


@settings(max_examples=200, deadline=None)
@given(
    data=st.fixed_dictionaries(
        {},
        optional={
            "releases": st.lists(entry_like | json_values, max_size=5) | json_values,
            "hash": json_values,
            "since": json_values,
            "format": json_values,
            "product": json_values,
        },
    )
    | st.lists(entry_like, max_size=5)
    | json_values
)
# Found by this test: a channel that is a list raised TypeError (unhashable) instead of
# leaving the entry out.
@example(data=[{"version": "1.0.0", "url": "b.tar", "sha256": "a" * 64, "size": 10, "channel": []}])
def test_any_index_answer_parses_or_is_a_feed_error(data: Any) -> None:
    try:
        entries, notes, index_hash, _ = parse_index(
            data, base_url="https://h/i.json", product="themisdb", sent_hash="h0", body_sha256="0"
        )
    except FeedError:
        return
    assert 1 <= len(index_hash) <= 128
    for entry in entries:
        assert entry.sha256 is not None and len(entry.sha256) == 64


@pytest.mark.parametrize("channel", [[], ["beta"], {"name": "beta"}, 7])
def test_an_entry_whose_channel_is_not_a_name_is_left_out_with_the_reason(channel: Any) -> None:
    entry = {"version": "1.0.0", "url": "b.tar", "sha256": "a" * 64, "size": 10, "channel": channel}
    entries, notes, _, _ = parse_index(
        {"releases": [entry]},
        base_url="https://h/i.json",
        product="themisdb",
        sent_hash="h0",
        body_sha256="0",
    )
    assert entries == []
    assert any("unknown channel" in n for n in notes)


def test_github_picks_the_bundle_asset_by_name() -> None:
    def asset(name: str) -> dict[str, Any]:
        return {"name": name, "size": 1, "browser_download_url": f"https://h/{name}", "id": 1}

    release = {
        "tag_name": "v1.7.0",
        "assets": [
            asset("SHA256SUMS"),
            asset("themisdb-1.7.0-linux.tar"),
            asset("themisdb-1.7.0.tar"),
            asset("themisdb-1.7.0.tar.zst"),
            asset("otherdb-1.7.0.tar.zst"),
        ],
    }
    entries, _ = parse_github([release], product="themisdb")
    assert [e.name for e in entries] == ["themisdb-1.7.0.tar.zst"]
    release["assets"] = [asset("themisdb-1.7.0-linux.tar"), asset("themisdb-1.7.0-arm.tar")]
    entries, _ = parse_github([release], product="themisdb")
    assert [e.name for e in entries] == ["themisdb-1.7.0-arm.tar"]
    with pytest.raises(FeedError):
        parse_github({"message": "Not Found"}, product="themisdb")

"""The release feeds page: operators only; feeds made, changed and disabled through its form;
each feed's last and next poll, rate limit, errors and imports; the token never shown."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from pytest_django.fixtures import Settings

from tests.helpers import MakeBundle
from tests.releases.feed_servers import Clock, FakeGitHub, Sleeper
from updates.engine.devpki import Pki
from updates.models import Event, Release, ReleaseFeed
from updates.notifications.crypto import decrypt_secrets
from updates.releases import feeds

pytestmark = pytest.mark.django_db

TOKEN = "ghp_pageTOKENvalue0123456789"


@pytest.fixture(autouse=True)
def _feed_settings(settings: Settings, trusted: Pki) -> None:
    settings.THEMIS_FEED_ALLOW_HTTP = True
    settings.THEMIS_FEED_EGRESS_ALLOW = ["127.0.0.1"]
    settings.THEMIS_FEED_TIMEOUT_SECONDS = 5


def form_data(**changes: Any) -> dict[str, Any]:
    data = {
        "name": "upstream",
        "kind": "github",
        "url": "http://127.0.0.1:8443/repos/themis/themisdb/releases",
        "product": "themisdb",
        "channel": "stable",
        "poll_interval_seconds": "900",
        "enabled": "on",
        "token": TOKEN,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize("persona", ["admin_a", "admin_b", "responder"])
def test_only_operators_see_or_change_feeds(personas: dict[str, Client], persona: str) -> None:
    feed = feeds.feed_create(user=None, **_plain(form_data()))
    client = personas[persona]
    assert client.get(reverse("release_feed_list")).status_code == 403
    assert client.get(reverse("release_feed_new")).status_code == 403
    assert client.post(reverse("release_feed_new"), form_data(name="x")).status_code == 403
    edit = reverse("release_feed_edit", args=[feed.pk])
    assert client.post(edit, form_data(enabled=None)).status_code == 403
    assert client.post(reverse("release_feed_poll", args=[feed.pk])).status_code == 403
    assert ReleaseFeed.objects.get().enabled and ReleaseFeed.objects.count() == 1
    nav = client.get(reverse("release_list")).content.decode()
    assert reverse("release_feed_list") not in nav


def test_anonymous_is_sent_to_login(personas: dict[str, Client]) -> None:
    response = personas["anonymous"].get(reverse("release_feed_list"))
    assert response.status_code == 302 and "/login" in response["Location"]


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": data["name"],
        "kind": data["kind"],
        "url": data["url"],
        "product": data["product"],
        "channel": data["channel"],
        "enabled": "enabled" in data,
        "poll_interval_seconds": int(data["poll_interval_seconds"]),
        "token": data.get("token", ""),
    }


def test_an_operator_creates_a_feed_whose_token_is_never_shown(
    personas: dict[str, Client],
) -> None:
    client = personas["operator"]
    assert client.get(reverse("release_feed_new")).status_code == 200

    response = client.post(reverse("release_feed_new"), form_data())

    assert response.status_code == 302
    feed = ReleaseFeed.objects.get()
    assert (feed.kind, feed.enabled, feed.poll_interval_seconds) == ("github", True, 900)
    assert TOKEN not in feed.token and decrypt_secrets(feed.token) == {"token": TOKEN}
    assert feed.token_hint.endswith(TOKEN[-4:]) and TOKEN not in feed.token_hint
    event = Event.objects.get(verb="release_feed.created")
    assert event.actor_label == "olivia" and TOKEN not in str(event.details)
    page = client.get(reverse("release_feed_list")).content.decode()
    edit = client.get(reverse("release_feed_edit", args=[feed.pk])).content.decode()
    for html in (page, edit):
        assert TOKEN not in html and feed.token not in html
    assert "upstream" in page and f"saved: {feed.token_hint}" in edit
    assert reverse("release_feed_list") in client.get(reverse("release_list")).content.decode()


def test_editing_keeps_or_clears_the_token_and_disables_the_feed(
    personas: dict[str, Client],
) -> None:
    client = personas["operator"]
    feed = feeds.feed_create(user=None, **_plain(form_data()))
    ReleaseFeed.objects.filter(pk=feed.pk).update(etag='"old"', index_hash="h1")
    edit = reverse("release_feed_edit", args=[feed.pk])

    response = client.post(edit, form_data(token="", enabled=None, poll_interval_seconds="120"))

    assert response.status_code == 302
    feed.refresh_from_db()
    assert not feed.enabled and feed.poll_interval_seconds == 120
    assert decrypt_secrets(feed.token) == {"token": TOKEN}  # left empty: kept
    assert feed.etag == '"old"'  # same URL: what it answered still holds
    assert feeds.feed_poll(feed.pk) is None  # disabled: never polled
    assert feeds.feeds_enqueue_due() == []

    new_url = "http://127.0.0.1:8443/repos/themis/other/releases"
    client.post(edit, form_data(token="", clear_token="on", url=new_url, kind="index"))
    feed.refresh_from_db()
    assert feed.enabled and feed.token == "" and feed.token_hint == ""
    assert feed.kind == "github"  # fixed once created
    assert feed.url == new_url and feed.etag == "" and feed.index_hash == ""
    assert feed.next_poll_at is not None and feed.next_poll_at <= timezone.now()
    changed = Event.objects.filter(verb="release_feed.updated").order_by("id")
    assert [e.details["token_changed"] for e in changed] == [False, True]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "http://10.1.2.3/repos/a/b/releases"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/repos/a/b/releases"}, "url"),
        ({"url": "http://127.0.0.1/repos/a/b/tags"}, "url"),
        ({"url": "http://127.0.0.1:99999/repos/a/b/releases"}, "url"),
        ({"url": "http://127.0.0.1/x\x00/repos/a/b/releases"}, "url"),
        ({"url": "h" * 600}, "url"),
        ({"product": "../etc"}, "product"),
        ({"poll_interval_seconds": "5"}, "poll_interval_seconds"),
        ({"poll_interval_seconds": "9" * 30}, "poll_interval_seconds"),
        ({"token": "two words"}, "token"),
        ({"token": "line\r\nX-Injected: 1"}, "token"),
        ({"kind": "ftp"}, "kind"),
        ({"name": "n" * 500}, "name"),
        ({"channel": "nightly"}, "channel"),
    ],
)
def test_hostile_form_input_is_a_400_never_a_500(
    personas: dict[str, Client], changes: dict[str, Any], field: str
) -> None:
    response = personas["operator"].post(reverse("release_feed_new"), form_data(**changes))
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert not ReleaseFeed.objects.exists()


def test_unknown_feeds_are_404(personas: dict[str, Client]) -> None:
    client = personas["operator"]
    assert client.get(reverse("release_feed_edit", args=[999])).status_code == 404
    assert client.post(reverse("release_feed_poll", args=[999])).status_code == 404


def test_the_page_shows_polls_rate_limits_errors_and_imports(
    personas: dict[str, Client],
    github: FakeGitHub,
    clock: Clock,
    sleeper: Sleeper,
    make_bundle: MakeBundle,
) -> None:
    github.add("v1.7.0", {"themisdb-1.7.0.tar": make_bundle("1.7.0").read_bytes()})
    github.add("v1.7.1", {"themisdb-1.7.1.tar": b"not a bundle" * 40})
    feed = feeds.feed_create(
        user=None, clock=clock, **_plain(form_data(url=github.releases_url, token=""))
    )
    feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper)
    clock.advance(900)
    reset = int(clock.now.timestamp()) + 600
    headers = {
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(reset),
    }
    message = b'{"message": "<script>alert(1)</script> API rate limit exceeded"}'
    github.script.append((403, headers, message))
    feeds.feed_poll(feed.pk, clock=clock, sleep=sleeper)
    feed.refresh_from_db()

    response = personas["operator"].get(reverse("release_feed_list"))

    assert response.status_code == 200
    html = response.content.decode()
    row = html[html.index(f'id="feed-{feed.pk}"') :]
    assert "rate limited" in row  # its state
    assert "0/60 left" in row and "exhausted until" in row
    assert "1 failed poll in a row" in row and "API rate limit exceeded" in row
    assert "1 imported, 1 rejected" in row
    assert "1.7.0 · imported" in row and "1.7.1 · rejected" in row
    assert feed.next_poll_at is not None
    assert feed.next_poll_at.strftime("%Y-%m-%d %H:%M:%S") in row
    assert "<script>alert" not in html and "&lt;script&gt;alert" in row  # escaped
    assert Release.objects.filter(version="1.7.0").exists()


def test_poll_now_queues_a_poll_once_and_waits_for_the_server(
    personas: dict[str, Client], django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        "updates.taskqueue.send_task", lambda name, *args, **kw: sent.append((name, args, kw))
    )
    feed = feeds.feed_create(user=None, **_plain(form_data()))
    url = reverse("release_feed_poll", args=[feed.pk])
    client = personas["operator"]

    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(url).status_code == 302
    assert sent == [("workers.tasks.poll_release_feed", (feed.pk,), {"countdown": None})]
    assert Event.objects.filter(verb="release_feed.poll_requested").count() == 1
    # Queued already: the second click queues nothing.
    with django_capture_on_commit_callbacks(execute=True):
        client.post(url)
    assert len(sent) == 1

    # A server that asked for quiet is not asked before it said.
    later = timezone.now() + timedelta(minutes=30)
    ReleaseFeed.objects.filter(pk=feed.pk).update(queued_until=None, not_before=later)
    with django_capture_on_commit_callbacks(execute=True):
        client.post(url)
    feed.refresh_from_db()
    assert feed.next_poll_at == later
    assert sent[-1][2]["countdown"] > 29 * 60


def test_each_feed_state_in_a_word() -> None:
    from updates.releases.selectors import feed_rows

    now = timezone.now()
    states: dict[str, dict[str, Any]] = {
        "never": {},
        "off": {"enabled": False},
        "failing": {"last_poll_at": now, "consecutive_failures": 2},
        "waiting": {"last_poll_at": now, "not_before": now + timedelta(minutes=5)},
        "fine": {"last_poll_at": now, "not_before": now - timedelta(minutes=5)},
    }
    for name, fields in states.items():
        feed = feeds.feed_create(user=None, **_plain(form_data(name=name)))
        ReleaseFeed.objects.filter(pk=feed.pk).update(**fields)

    rows = {row.feed.name: row.state for row in feed_rows(now)}

    assert rows == {
        "never": "never polled",
        "off": "disabled",
        "failing": "failing",
        "waiting": "rate limited",
        "fine": "ok",
    }

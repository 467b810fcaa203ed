"""Configuration pages for every persona: status code AND database state.
Operators: everything. Tenant admins: their own tenants (others 404).
Responders: read-only."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tests.conftest import Fleet
from tests.notifications.conftest import (
    SIGNING_SECRET,
    SLACK_PATH,
    MakeChannel,
    Nudges,
    Receiver,
)
from updates.models import Event
from updates.notifications.dispatch import DELIVER_TASK
from updates.notifications.models import Channel, Delivery

pytestmark = pytest.mark.django_db

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

ALL_PERSONAS = ["operator", "admin_a", "admin_b", "responder"]


@pytest.fixture
def channels(make_channel: MakeChannel, receiver: Receiver, fleet: Fleet) -> dict[str, Channel]:
    return {
        "fleet": make_channel("slack", receiver.url, name="fleet slack"),
        "a": make_channel("webhook", receiver.url, tenant=fleet.tenant_a, name="a hook"),
        "b": make_channel("slack", receiver.url, tenant=fleet.tenant_b, name="b slack"),
    }


def _post_slack(
    client: Client,
    *,
    tenant: int | str = "",
    url: str = "https://hooks.slack.com/services/T1/B1/abcdefSECRET",
) -> _MonkeyPatchedWSGIResponse:
    return client.post(
        reverse("notifications:channel_create"),
        {"name": "new", "type": "slack", "tenant": tenant, "kinds": ["rollout_failed"], "url": url},
    )


def test_anonymous_is_sent_to_login(personas: dict[str, Client]) -> None:
    response = personas["anonymous"].get(reverse("notifications:channel_list"))
    assert response.status_code == 302 and "/login/" in response["Location"]


@pytest.mark.parametrize(
    ("persona", "visible"),
    [
        ("operator", {"fleet slack", "a hook", "b slack"}),
        ("responder", {"fleet slack", "a hook", "b slack"}),
        ("admin_a", {"a hook"}),
        ("admin_b", {"b slack"}),
    ],
)
def test_list_is_scoped_and_secrets_never_render(
    personas: dict[str, Client], channels: dict[str, Channel], persona: str, visible: set[str]
) -> None:
    response = personas[persona].get(reverse("notifications:channel_list"))
    assert response.status_code == 200
    body = response.content.decode()
    for name in {"fleet slack", "a hook", "b slack"}:
        assert (name in body) is (name in visible)
    assert "SECRET" not in body and SIGNING_SECRET not in body
    assert "…" in body  # the masked hint is shown instead
    assert ("Send test" in body) is (persona != "responder")


def test_operator_creates_a_fleet_wide_channel_with_encrypted_secret(
    personas: dict[str, Client],
) -> None:
    response = _post_slack(personas["operator"])
    assert response.status_code == 302
    channel = Channel.objects.get(name="new")
    assert channel.tenant is None and channel.kinds == ["rollout_failed"]
    assert "abcdefSECRET" not in channel.secrets  # encrypted at rest
    assert channel.secret_hints == {"url": "https://hooks.slack.com/…CRET"}
    assert Event.objects.filter(verb="notification.channel_created").exists()
    assert "abcdefSECRET" not in str(Event.objects.values_list("details", flat=True)[0])


def test_tenant_admin_creates_for_own_tenant_only(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    assert _post_slack(personas["admin_a"], tenant=fleet.tenant_a.pk).status_code == 302
    assert Channel.objects.get(name="new").tenant == fleet.tenant_a
    assert _post_slack(personas["admin_a"], tenant=fleet.tenant_b.pk).status_code == 400
    assert _post_slack(personas["admin_a"], tenant="").status_code == 400  # no fleet-wide
    assert Channel.objects.count() == 1


def test_responder_cannot_create(personas: dict[str, Client]) -> None:
    assert personas["responder"].get(reverse("notifications:channel_create")).status_code == 403
    assert _post_slack(personas["responder"]).status_code == 403
    assert Channel.objects.count() == 0


def test_plain_http_and_bad_keys_are_refused(
    personas: dict[str, Client], settings: Settings
) -> None:
    settings.THEMIS_NOTIFY_ALLOW_HTTP = False
    assert _post_slack(personas["operator"], url="http://hooks.example/x").status_code == 400
    response = personas["operator"].post(
        reverse("notifications:channel_create"),
        {"name": "pd", "type": "pagerduty", "kinds": ["rollout_failed"], "routing_key": "x y"},
    )
    assert response.status_code == 400
    assert Channel.objects.count() == 0


def test_pagerduty_keeps_only_kinds_it_can_act_on(personas: dict[str, Client]) -> None:
    response = personas["operator"].post(
        reverse("notifications:channel_create"),
        {
            "name": "pd",
            "type": "pagerduty",
            "kinds": ["rollout_failed", "stage_completed", "completed"],
            "routing_key": "a" * 32,
        },
    )
    assert response.status_code == 302
    assert Channel.objects.get(name="pd").kinds == ["completed", "rollout_failed"]


@pytest.mark.parametrize(
    ("persona", "channel", "status"),
    [
        ("operator", "fleet", 200),
        ("operator", "b", 200),
        ("admin_a", "a", 200),
        ("admin_a", "b", 404),
        ("admin_a", "fleet", 404),
        ("admin_b", "a", 404),
        ("responder", "a", 403),
        ("responder", "fleet", 403),
    ],
)
def test_edit_page_is_scoped(
    personas: dict[str, Client],
    channels: dict[str, Channel],
    persona: str,
    channel: str,
    status: int,
) -> None:
    response = personas[persona].get(
        reverse("notifications:channel_edit", args=[channels[channel].pk])
    )
    assert response.status_code == status
    if status == 200:
        assert SLACK_PATH.encode() not in response.content
        assert SIGNING_SECRET.encode() not in response.content
        assert b"saved: " in response.content  # masked placeholder


def test_edit_keeps_secrets_left_empty_and_replaces_given_ones(
    personas: dict[str, Client], channels: dict[str, Channel], receiver: Receiver
) -> None:
    channel = channels["a"]
    before = channel.secrets
    url = reverse("notifications:channel_edit", args=[channel.pk])
    form = {"name": "renamed", "kinds": ["rollout_failed", "paused"], "enabled": "on"}
    assert personas["admin_a"].post(url, form).status_code == 302
    channel.refresh_from_db()
    assert (channel.name, channel.secrets) == ("renamed", before)
    assert channel.kinds == ["paused", "rollout_failed"]
    form["signing_secret"] = "a-brand-new-signing-secret"
    assert personas["admin_a"].post(url, form).status_code == 302
    channel.refresh_from_db()
    assert channel.secrets != before
    from updates.notifications.crypto import decrypt_secrets

    secrets = decrypt_secrets(channel.secrets)
    assert secrets["signing_secret"] == "a-brand-new-signing-secret"
    assert secrets["url"] == receiver.url + "/hook"  # the other secret was kept


def test_other_tenants_admin_cannot_edit_delete_or_test(
    personas: dict[str, Client], channels: dict[str, Channel], receiver: Receiver
) -> None:
    channel = channels["a"]
    for name in ("channel_edit", "channel_delete", "channel_test"):
        response = personas["admin_b"].post(reverse(f"notifications:{name}", args=[channel.pk]), {})
        assert response.status_code == 404
    assert Channel.objects.filter(pk=channel.pk, name="a hook").exists()
    assert receiver.requests == []


def test_delete(personas: dict[str, Client], channels: dict[str, Channel]) -> None:
    url = reverse("notifications:channel_delete", args=[channels["a"].pk])
    assert personas["responder"].post(url).status_code == 403
    assert personas["admin_a"].post(url).status_code == 302
    assert not Channel.objects.filter(pk=channels["a"].pk).exists()


def test_send_test_is_queued_for_the_delivery_task_and_shown_live(
    personas: dict[str, Client],
    channels: dict[str, Channel],
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    url = reverse("notifications:channel_test", args=[channels["fleet"].pk])
    assert personas["responder"].post(url).status_code == 403
    assert receiver.requests == []

    with django_capture_on_commit_callbacks(execute=True):
        response = personas["operator"].post(url, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert b"Queued" in response.content and b"<html" not in response.content
    # The web process sent nothing: the message waits for a coordinator.
    assert receiver.requests == []
    delivery = Delivery.objects.get(is_test=True)
    assert nudges.sent == [(DELIVER_TASK, delivery.pk, 0)]
    status_url = reverse("notifications:test_delivery_status", args=[delivery.pk])
    assert personas["operator"].get(status_url).status_code == 200  # still polling

    nudges.run()
    assert receiver.requests[0].path == SLACK_PATH
    assert "Test notification for fleet slack" in receiver.requests[0].json()["text"]
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("sent", 1)
    response = personas["operator"].get(status_url, headers={"HX-Request": "true"})
    assert response.status_code == 286  # htmx: stop polling
    assert b"Sent" in response.content
    # A tenant admin of another tenant cannot follow a fleet channel's test.
    assert personas["admin_a"].get(status_url).status_code == 404


def test_send_test_failure_shows_the_status_and_is_not_retried(
    personas: dict[str, Client],
    channels: dict[str, Channel],
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    receiver.default = (403, {}, b"invalid_token")
    url = reverse("notifications:channel_test", args=[channels["fleet"].pk])
    with django_capture_on_commit_callbacks(execute=True):
        response = personas["operator"].post(url, follow=True)
    assert response.status_code == 200
    assert b"queued" in response.content
    nudges.run()
    delivery = Delivery.objects.get(is_test=True)
    assert (delivery.status, delivery.attempts) == ("gave_up", 1)
    status_url = reverse("notifications:test_delivery_status", args=[delivery.pk])
    response = personas["operator"].get(status_url)
    assert b"HTTP 403 Forbidden: invalid_token" in response.content


def test_send_test_to_a_private_address_is_refused_by_the_worker(
    personas: dict[str, Client],
    make_channel: MakeChannel,
    notify_settings: Settings,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    # Saved while loopback was allowed; the operator then removed it from the allowlist.
    channel = make_channel("webhook", "http://127.0.0.1:9")
    notify_settings.THEMIS_NOTIFY_EGRESS_ALLOW = []
    with django_capture_on_commit_callbacks(execute=True):
        personas["operator"].post(reverse("notifications:channel_test", args=[channel.pk]))
    nudges.run()
    delivery = Delivery.objects.get(is_test=True)
    assert delivery.status == "gave_up"
    assert "refused" in delivery.last_error and "loopback" in delivery.last_error


def test_pagerduty_test_never_pages_anyone(
    personas: dict[str, Client],
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    channel = make_channel("pagerduty", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        personas["operator"].post(reverse("notifications:channel_test", args=[channel.pk]))
    nudges.run()
    assert receiver.requests[0].json()["event_action"] == "resolve"


@pytest.mark.parametrize(
    ("persona", "visible"),
    [
        ("operator", {"fleet slack", "a hook", "b slack"}),
        ("responder", {"fleet slack", "a hook", "b slack"}),
        ("admin_a", {"a hook"}),
    ],
)
def test_delivery_log_is_scoped(
    personas: dict[str, Client], channels: dict[str, Channel], persona: str, visible: set[str]
) -> None:
    for channel in channels.values():
        Delivery.objects.create(
            channel=channel,
            kind="rollout_failed",
            status="gave_up",
            attempts=3,
            last_error=f"error for {channel.name}",
            payload={"title": f"Rollout failed on {channel.name}"},
        )
    response = personas[persona].get(reverse("notifications:delivery_list"))
    assert response.status_code == 200
    body = response.content.decode()
    for channel in channels.values():
        assert (f"error for {channel.name}" in body) is (channel.name in visible)


def test_delivery_log_filters_with_htmx_partial(
    personas: dict[str, Client], channels: dict[str, Channel]
) -> None:
    Delivery.objects.create(channel=channels["a"], kind="paused", status="sent", payload={})
    Delivery.objects.create(channel=channels["b"], kind="paused", status="gave_up", payload={})
    response = personas["operator"].get(
        reverse("notifications:delivery_list"),
        {"status": "gave_up"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="delivery-results"')
    assert "b slack" in body and "a hook" not in body


def test_nav_has_the_notifications_link(personas: dict[str, Client]) -> None:
    response = personas["operator"].get(reverse("fleet"))
    assert reverse("notifications:channel_list").encode() in response.content


def test_a_refused_url_keeps_everything_else_that_was_typed(
    personas: dict[str, Client], settings: Settings
) -> None:
    settings.THEMIS_NOTIFY_ALLOW_HTTP = False
    response = personas["operator"].post(
        reverse("notifications:channel_create"),
        {
            "name": "on-call hook",
            "type": "webhook",
            "kinds": ["rollout_failed", "node_offline"],
            "url": "http://hooks.example/x",
            "signing_secret": "a-signing-secret-of-length",
        },
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert "Enter an https:// URL" in body
    assert 'value="on-call hook"' in body
    assert 'value="a-signing-secret-of-length"' in body  # typed, not lost
    assert 'value="http://hooks.example/x"' in body  # to correct, not to type again
    assert re.search(r'value="node_offline"[^>]*checked', body)
    assert "no-store" in response.headers["Cache-Control"]
    assert not Channel.objects.exists()


def test_a_saved_secret_never_renders_even_on_a_refused_edit(
    personas: dict[str, Client], channels: dict[str, Channel]
) -> None:
    channel = next(iter(channels.values()))
    response = personas["operator"].post(
        reverse("notifications:channel_edit", args=[channel.pk]),
        {"name": "", "kinds": channel.kinds},
    )
    assert response.status_code == 400
    body = response.content.decode()
    for secret in channel.secret_hints:  # rendered empty: what was sent had none of them
        assert re.search(rf'name="{secret}"(?![^>]*value=)', body), secret
    assert "hooks.slack.com/services" not in body

"""The egress guard: notifications reach public hosts only, follow no redirect, and never
leak a secret URL into the delivery log."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from tests.notifications.conftest import SLACK_PATH, Receiver, StartReceiver
from updates.notifications.channels import (
    PermanentError,
    SignedWebhookChannel,
    SlackChannel,
    redact,
)
from updates.notifications.egress import EgressPolicy, EgressRefused, check_url, guarded_send
from updates.notifications.models import Channel

STRICT = EgressPolicy()
LOOPBACK_ALLOWED = EgressPolicy.from_setting(["127.0.0.1"])
EVENT = {
    "title": "Rollout #1 failed",
    "text": "1 node failed",
    "emoji": ":x:",
    "kind": "rollout_failed",
    "id": "d1",
}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.1.2.3/hook", "loopback"),
        ("http://0x7f000001/hook", "loopback"),
        ("http://2130706433/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.8/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://100.64.0.1/hook", "private"),  # carrier-grade NAT (shared)
        ("http://[fc00::1]/hook", "private"),
        ("http://[2002:a00:1::]/hook", "private"),  # 6to4 wrapping 10.0.0.1
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
    ],
)
def test_forbidden_address_literals_are_refused_in_every_spelling(url: str, why: str) -> None:
    with pytest.raises(EgressRefused, match=why):
        check_url(url, STRICT, allow_http=True)


@pytest.mark.parametrize(
    "url", ["https://[::1", "ftp://example.com/x", "https:///path-only", "javascript:alert(1)"]
)
def test_malformed_or_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(EgressRefused):
        check_url(url, STRICT, allow_http=True)


def test_plain_http_needs_the_setting() -> None:
    with pytest.raises(EgressRefused, match="scheme 'http'"):
        check_url("http://hooks.example.com/x", STRICT, allow_http=False)
    check_url("https://hooks.example.com/x", STRICT, allow_http=False)


def test_a_name_is_checked_on_what_it_resolves_to(receiver: Receiver) -> None:
    send = guarded_send(timeout=2, policy=STRICT, allow_http=True)
    url = receiver.url.replace("127.0.0.1", "localhost") + "/hook"
    with pytest.raises(EgressRefused, match="localhost resolves to 127.0.0.1"):
        send(url, b"{}", {})
    assert receiver.requests == []


def test_the_allowlist_lets_an_operator_reach_a_local_receiver(receiver: Receiver) -> None:
    send = guarded_send(timeout=2, policy=LOOPBACK_ALLOWED, allow_http=True)
    status, _, _ = send(receiver.url + "/hook", b"{}", {})
    assert status == 200
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_a_bad_allowlist_entry_names_itself() -> None:
    with pytest.raises(ValueError, match="'not-a-net'"):
        EgressPolicy.from_setting(["127.0.0.1", "not-a-net"])


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test decides the answers for; the rest resolve as usual."""
    real = socket.getaddrinfo
    answers: dict[str, list[str]] = {}

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_a_rebinding_name_is_refused_when_the_connection_is_made(
    resolver: dict[str, list[str]], receiver: Receiver
) -> None:
    # Saved while the name looked public; now it answers loopback (where the receiver is).
    resolver["rebind.test"] = ["127.0.0.1"]
    check_url("http://rebind.test/hook", STRICT, allow_http=True)  # a name: nothing to refuse yet
    send = guarded_send(timeout=2, policy=STRICT, allow_http=True)
    port = receiver.url.rsplit(":", 1)[1]
    with pytest.raises(EgressRefused, match="rebind.test resolves to 127.0.0.1"):
        send(f"http://rebind.test:{port}/hook", b"{}", {})
    assert receiver.requests == []


def test_one_forbidden_answer_refuses_the_whole_name(resolver: dict[str, list[str]]) -> None:
    resolver["mixed.test"] = ["93.184.216.34", "169.254.169.254"]
    with pytest.raises(EgressRefused, match="169.254.169.254, a link-local address"):
        STRICT.connect("mixed.test", 80, 1.0)


def test_redirects_are_never_followed_by_any_channel(receivers: StartReceiver) -> None:
    internal = receivers()
    front = receivers()
    front.default = (302, {"Location": internal.url + "/admin"}, b"")
    send = guarded_send(timeout=2, policy=LOOPBACK_ALLOWED, allow_http=True)
    for channel in (
        SlackChannel(url=front.url + SLACK_PATH, send=send),
        SignedWebhookChannel(url=front.url + "/hook", secret="s" * 32, send=send),
    ):
        with pytest.raises(PermanentError, match="HTTP 302"):
            channel.send({**EVENT, "severity": "error"})
    assert len(front.requests) == 2
    assert internal.requests == []


@pytest.mark.parametrize(
    "secret",
    [
        "T000/B000/abcdefXYZ123",
        "tok en|with spaces",
        "tökén-ünïcode-secret",
    ],
)
def test_every_form_of_a_secret_url_is_redacted(secret: str) -> None:
    from urllib.parse import quote, quote_plus

    url = "https://hooks.example.com/services/" + quote(secret, safe="/")
    for leaked in (
        url,
        quote(url, safe=""),
        "/services/" + secret,
        quote(secret, safe=""),
        quote_plus(secret),
        secret,
    ):
        message = redact(f"Slack: failed posting to {leaked} (retry)", url)
        assert secret not in message
        assert quote(secret, safe="") not in message
        assert quote_plus(secret) not in message
        assert message.startswith("Slack: failed posting to")


def test_the_channel_form_refuses_a_private_url_and_a_malformed_one(
    personas: dict[str, Client], notify_settings: Settings
) -> None:
    notify_settings.THEMIS_NOTIFY_EGRESS_ALLOW = []
    url = reverse("notifications:channel_create")
    for bad in ("https://169.254.169.254/x", "https://[::1", "https://0x7f000001/"):
        response = personas["operator"].post(
            url,
            {
                "name": "sneaky",
                "type": "webhook",
                "kinds": ["rollout_failed"],
                "enabled": "on",
                "url": bad,
                "signing_secret": "s" * 32,
            },
        )
        assert response.status_code == 400, bad
        assert b"public host" in response.content, bad
    assert not Channel.objects.filter(name="sneaky").exists()

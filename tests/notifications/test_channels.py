"""The three channels against real HTTP servers on 127.0.0.1: what goes over
the wire is what Slack, PagerDuty and webhook receivers expect."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from slack_sdk.models.blocks import Block

from tests.notifications.conftest import ROUTING_KEY, SIGNING_SECRET, SLACK_PATH, Receiver
from updates.engine.protocols import HttpSend
from updates.notifications.channels import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryError,
    PagerDutyChannel,
    PermanentError,
    RateLimited,
    SignedWebhookChannel,
    SlackChannel,
    TransientError,
    retry_after_seconds,
    verify,
)
from updates.notifications.egress import EgressPolicy, guarded_send


def local_send(*, timeout: float = 5.0) -> HttpSend:
    """The real guarded transport, allowed to reach the tests' receivers on loopback."""
    return guarded_send(
        timeout=timeout, policy=EgressPolicy.from_setting(["127.0.0.1"]), allow_http=True
    )


LOCAL = local_send()

APPROVAL = {
    "id": "7d8c1f0e-0000-4000-8000-000000000001",
    "kind": "awaiting_approval",
    "verb": "rollout.awaiting_approval",
    "severity": "warning",
    "emoji": ":raised_hand:",
    "pagerduty_action": "",
    "incident_key": "themis-rollout-12",
    "title": "Rollout #12 is awaiting approval",
    "text": "Release 1.7.0 · canary · stage 1. <script>&",
    "tenant": "Tenant A",
    "release": "1.7.0",
    "rollout": {"id": 12, "name": "canary"},
    "stage": 1,
    "nodes": {"done": 10, "failed": 0, "total": 1000},
    "node": None,
    "action_needed": "Approve the promotion to stage 2, or pause/abort the rollout.",
    "url": "https://themis.example.test/rollouts/12/",
    "source": "themis.example.test",
    "component": "rollout",
    "occurred_at": "2026-11-30T10:00:00Z",
    "event_ids": [41],
    "details": {},
    "test": False,
}
FAILED = {
    **APPROVAL,
    "kind": "rollout_failed",
    "verb": "rollout.failed",
    "severity": "critical",
    "emoji": ":x:",
    "pagerduty_action": "trigger",
    "title": "Rollout #12 failed",
    "text": "Release 1.7.0 · canary · stage 2. Reason: 3 nodes failed health checks",
    "action_needed": None,
    "items": [
        {"node": "n-1", "kind": "node_failed", "label": "Node update failed", "error_code": "X"}
    ],
    "items_total": 3,
    "details": {"reason": "3 nodes failed health checks"},
}


def test_slack_message_is_block_kit_as_slack_documents_it(receiver: Receiver) -> None:
    SlackChannel(url=receiver.url + SLACK_PATH, send=LOCAL).send(APPROVAL)

    (request,) = receiver.requests
    assert request.path == SLACK_PATH
    assert request.headers["Content-Type"].startswith("application/json")
    body = request.json()
    assert set(body) == {"text", "blocks", "unfurl_links"}
    assert body["text"].startswith("Rollout #12 is awaiting approval")  # notification fallback
    types = [b["type"] for b in body["blocks"]]
    assert types == ["header", "section", "section", "section", "actions", "context"]
    for raw in body["blocks"]:  # each parses and validates as a Slack SDK block
        block = Block.parse(raw)
        assert block is not None
        block.validate_json()
    header, summary, facts, action, buttons, _ = body["blocks"]
    assert header["text"] == {
        "type": "plain_text",
        "text": ":raised_hand: Rollout #12 is awaiting approval",
        "emoji": True,
    }
    assert "&lt;script&gt;&amp;" in summary["text"]["text"]  # mrkdwn control chars escaped
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in facts["fields"]}
    assert fields["*Release*"] == "1.7.0"
    assert fields["*Rollout*"] == "#12 canary"
    assert fields["*Stage*"] == "1"
    assert fields["*Nodes*"] == "10 done · 1000 total"
    assert action["text"]["text"].startswith("*Action needed:* Approve the promotion")
    (button,) = buttons["elements"]
    assert button["url"] == "https://themis.example.test/rollouts/12/"
    assert button["style"] == "primary"


def test_slack_lists_aggregated_items_and_the_rest_as_a_count(receiver: Receiver) -> None:
    SlackChannel(url=receiver.url + SLACK_PATH, send=LOCAL).send(FAILED)
    blocks = receiver.requests[0].json()["blocks"]
    listing = next(b for b in blocks if "•" in b.get("text", {}).get("text", ""))
    assert "`n-1` Node update failed — X" in listing["text"]["text"]
    assert listing["text"]["text"].endswith("…and 2 more")


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "retry_after"),
    [
        (429, {"Retry-After": "7"}, b"rate_limited", RateLimited, 7.0),
        (500, {}, b"internal", TransientError, None),
        (503, {}, b"", TransientError, None),
        (404, {}, b"no_service", PermanentError, None),
        (403, {}, b"invalid_token", PermanentError, None),
    ],
)
def test_slack_errors_say_whether_to_retry(
    receiver: Receiver,
    status: int,
    headers: dict[str, str],
    body: bytes,
    error: type[DeliveryError],
    retry_after: float | None,
) -> None:
    receiver.answer((status, headers, body))
    with pytest.raises(error) as raised:
        SlackChannel(url=receiver.url + SLACK_PATH, send=LOCAL).send(APPROVAL)
    assert raised.value.status == status
    assert raised.value.retryable is (error is not PermanentError)
    assert f"HTTP {status}" in raised.value.message
    if retry_after is not None:
        assert isinstance(raised.value, RateLimited)  # narrows: only it has a retry_after
        assert raised.value.retry_after == retry_after
    assert len(receiver.requests) == 1  # the SDK's own retry handlers are off


def test_connection_refused_is_transient_and_never_leaks_the_secret_url() -> None:
    url = "http://127.0.0.1:9" + SLACK_PATH  # discard port: nothing listens
    with pytest.raises(TransientError) as raised:
        SlackChannel(url=url, send=local_send(timeout=1)).send(APPROVAL)
    assert "XXXXSECRETXXXX" not in raised.value.message
    assert "Slack:" in raised.value.message


def test_pagerduty_trigger_is_an_events_v2_event(receiver: Receiver) -> None:
    receiver.answer((202, {}, b'{"status":"success","dedup_key":"themis-rollout-12"}'))
    PagerDutyChannel(
        routing_key=ROUTING_KEY, events_url=receiver.url + "/v2/enqueue", send=LOCAL
    ).send(FAILED)

    (request,) = receiver.requests
    assert request.path == "/v2/enqueue"
    body = request.json()
    assert body["routing_key"] == ROUTING_KEY
    assert body["event_action"] == "trigger"
    assert body["dedup_key"] == "themis-rollout-12"
    payload = body["payload"]
    assert payload["severity"] in {"critical", "error", "warning", "info"}
    assert payload["severity"] == "critical"
    assert payload["summary"].startswith("Rollout #12 failed: Release 1.7.0")
    assert len(payload["summary"]) <= 1024
    assert payload["source"] == "themis.example.test"
    assert payload["timestamp"] == "2026-11-30T10:00:00Z"
    assert payload["class"] == "rollout_failed"
    assert payload["group"] == "Tenant A"
    assert payload["custom_details"]["release"] == "1.7.0"
    assert payload["custom_details"]["items_total"] == 3
    assert body["links"] == [
        {
            "href": "https://themis.example.test/rollouts/12/",
            "text": "Open in Themis Update Manager",
        }
    ]


def test_pagerduty_resolve_is_minimal(receiver: Receiver) -> None:
    resolve = {**FAILED, "pagerduty_action": "resolve", "kind": "completed"}
    PagerDutyChannel(routing_key=ROUTING_KEY, events_url=receiver.url, send=LOCAL).send(resolve)
    assert receiver.requests[0].json() == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "themis-rollout-12",
    }


def test_pagerduty_ignores_kinds_it_cannot_act_on(receiver: Receiver) -> None:
    PagerDutyChannel(routing_key=ROUTING_KEY, events_url=receiver.url, send=LOCAL).send(APPROVAL)
    assert receiver.requests == []


def test_pagerduty_bad_request_is_permanent(receiver: Receiver) -> None:
    receiver.answer((400, {}, b'{"status":"invalid event","errors":["x"]}'))
    with pytest.raises(PermanentError, match="HTTP 400"):
        PagerDutyChannel(routing_key=ROUTING_KEY, events_url=receiver.url, send=LOCAL).send(FAILED)


def test_signed_webhook_signature_verifies_with_the_shared_secret(receiver: Receiver) -> None:
    channel = SignedWebhookChannel(
        url=receiver.url + "/hook", secret=SIGNING_SECRET, clock=lambda: 1_800_000_000, send=LOCAL
    )
    channel.send(FAILED)

    (request,) = receiver.requests
    assert request.headers[EVENT_HEADER] == "rollout_failed"
    assert request.headers[DELIVERY_HEADER] == FAILED["id"]
    assert request.headers[TIMESTAMP_HEADER] == "1800000000"
    signature = request.headers[SIGNATURE_HEADER]
    assert signature.startswith("sha256=")
    assert verify(SIGNING_SECRET, "1800000000", request.body, signature)
    # Independent check, as a receiver in another language would do it:
    import hashlib
    import hmac

    expected = hmac.new(SIGNING_SECRET.encode(), b"1800000000." + request.body, hashlib.sha256)
    assert signature == "sha256=" + expected.hexdigest()
    assert not verify(SIGNING_SECRET, "1800000000", request.body + b" ", signature)
    assert not verify("another-secret-entirely", "1800000000", request.body, signature)
    assert not verify(SIGNING_SECRET, "1800000001", request.body, signature)  # no replay
    assert request.json()["title"] == "Rollout #12 failed"


def test_http_send_is_injectable() -> None:
    calls: list[tuple[str, bytes, dict[str, str]]] = []

    def fake_send(
        url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        calls.append((url, body, dict(headers)))
        return 200, {}, b"ok"

    SlackChannel(url="https://hooks.slack.test/x", send=fake_send).send(APPROVAL)
    PagerDutyChannel(routing_key=ROUTING_KEY, events_url="https://pd.test", send=fake_send).send(
        FAILED
    )
    SignedWebhookChannel(url="https://hook.test", secret=SIGNING_SECRET, send=fake_send).send(
        FAILED
    )
    assert [c[0] for c in calls] == [
        "https://hooks.slack.test/x",
        "https://pd.test",
        "https://hook.test",
    ]
    assert SIGNATURE_HEADER in calls[2][2]


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after_seconds({"retry-after": "30"}) == 30.0
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert retry_after_seconds({"Retry-After": date}, now=1445412500.0) == 10.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None

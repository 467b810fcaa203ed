"""The three real `NotificationWebhook`s: Slack, PagerDuty Events API v2 and a
signed JSON webhook. No Django import: each channel gets a notification (a
plain mapping, see `messages.py`), renders it, and posts it through an
injectable `HttpSend`, so tests can swap the transport and integration tests
talk to real HTTP servers.

A failed send raises a `DeliveryError` subclass that says whether retrying can
help, and for how long the receiver asked us to wait (Slack's 429 Retry-After).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlsplit

import requests
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from updates.engine.protocols import HttpSend

from .egress import EgressPolicy, EgressRefused, guarded_send

USER_AGENT = "Themis-Update-Manager/1 (+notifications)"
SIGNATURE_HEADER = "X-Themis-Signature"
TIMESTAMP_HEADER = "X-Themis-Timestamp"
EVENT_HEADER = "X-Themis-Event"
DELIVERY_HEADER = "X-Themis-Delivery"
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
MAX_LISTED_ITEMS = 10
# A receiver's body is shown only when it is a bare error code like Slack's.
SHORT_REASON = re.compile(r"[a-z][a-z0-9_]{1,39}")
# Statuses where the same request may succeed later.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class DeliveryError(Exception):
    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TransientError(DeliveryError):
    """Connection refused, timeout, 5xx: worth another attempt after a backoff."""


class RateLimited(TransientError):
    """HTTP 429: wait at least `retry_after` seconds (when the receiver said)."""

    def __init__(self, message: str, *, status: int = 429, retry_after: float | None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """The receiver refused the message itself (bad URL, revoked key, 4xx): do not retry."""

    retryable = False


# ------------------------------------------------------------------ transports


def default_send(*, timeout: float) -> HttpSend:
    """Public addresses only, no redirects: what a channel uses when nobody passes a send."""
    return guarded_send(timeout=timeout, policy=EgressPolicy())


def _post(send: HttpSend, url: str, body: bytes, headers: Mapping[str, str], service: str) -> bytes:
    try:
        status, response_headers, response_body = send(url, body, headers)
    except EgressRefused as refused:
        raise PermanentError(redact(f"{service}: refused: {refused}", url)) from None
    except Exception as err:  # any transport failure is worth a retry
        # The class only: a connection error's text names hosts and ports (no port scanning).
        raise TransientError(f"{service}: {_failure_kind(err)}") from None
    check_response(service, status, response_headers, response_body)
    return response_body


def _failure_kind(err: Exception) -> str:
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, requests.ConnectionError):
        return "could not connect"
    return f"request failed ({type(err).__name__})"


def check_response(service: str, status: int, headers: Mapping[str, str], body: bytes) -> None:
    """Only the status reaches the delivery log: a receiver's body may echo anything."""
    if 200 <= status < 300:
        return
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    message = f"{service}: HTTP {status}" + (f" {phrase}" if phrase else "")
    code = body[:64].decode("ascii", "replace").strip()
    if SHORT_REASON.fullmatch(code):
        # Slack answers with a bare error code ("invalid_token"): short, safe and useful.
        message += f": {code}"
    if status == 429:
        raise RateLimited(message, retry_after=retry_after_seconds(headers))
    if status in RETRYABLE_STATUSES or status >= 500:
        raise TransientError(message, status=status)
    raise PermanentError(message + " (not retried)", status=status)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP-date), None when absent or bad."""
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


def redact(message: str, url: str) -> str:
    """Remove a secret URL from a message in every form it may appear in: whole, as its path
    and query (where tokens live), or any long path segment or query value, each raw,
    percent-decoded and percent-encoded (with or without '/' and '+' for spaces)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = urlsplit("")
    path_query = parts.path + (f"?{parts.query}" if parts.query else "")
    pieces = [url, path_query if len(path_query) > 1 else ""]
    pieces += [segment for segment in parts.path.split("/") if len(segment) >= 6]
    pieces += [value for _, value in parse_qsl(parts.query) if len(value) >= 6]
    forms: set[str] = set()
    for piece in filter(None, pieces):
        for text in (piece, unquote(piece), unquote_plus(piece)):
            forms.update({text, quote(text, safe=""), quote(text, safe="/"), quote_plus(text)})
    # Longest first, so a whole URL goes before the segment inside it.
    for form in sorted(filter(None, forms), key=len, reverse=True):
        message = message.replace(form, "…")
    return message


# ---------------------------------------------------------------------- Slack


def _esc(value: Any) -> str:
    """Slack mrkdwn needs &, < and > escaped (they start links and mentions)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _nodes_text(nodes: Mapping[str, Any]) -> str:
    parts = [f"{nodes.get('done', 0)} done"]
    if nodes.get("failed"):
        parts.append(f"{nodes['failed']} failed")
    if nodes.get("total") is not None:
        parts.append(f"{nodes['total']} total")
    return " · ".join(parts)


def _fields(event: Mapping[str, Any]) -> list[MarkdownTextObject]:
    rollout = event.get("rollout") or {}
    pairs = [
        ("Release", event.get("release")),
        ("Rollout", f"#{rollout['id']} {rollout.get('name') or ''}".strip() if rollout else None),
        ("Stage", event.get("stage")),
        ("Nodes", _nodes_text(event["nodes"]) if event.get("nodes") else None),
        ("Node", event.get("node")),
        ("Tenant", event.get("tenant")),
        ("Severity", event.get("severity")),
    ]
    return [
        MarkdownTextObject(text=_cut(f"*{label}*\n{_esc(value)}", 2000))
        for label, value in pairs
        if value not in (None, "")
    ][:10]


def _items_text(event: Mapping[str, Any]) -> str:
    items = list(event.get("items") or [])
    lines = [
        f"• `{_esc(i.get('node') or '?')}` {_esc(i.get('label') or i.get('kind', ''))}"
        + (f" — {_esc(i['error_code'])}" if i.get("error_code") else "")
        + (f": {_esc(_cut(str(i['error']), 120))}" if i.get("error") else "")
        for i in items[:MAX_LISTED_ITEMS]
    ]
    more = int(event.get("items_total") or len(items)) - len(lines)
    if more > 0:
        lines.append(f"…and {more} more")
    return _cut("\n".join(lines), 3000)


def slack_blocks(event: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [
        HeaderBlock(
            text=PlainTextObject(text=_cut(f"{event['emoji']} {event['title']}", 150), emoji=True)
        ),
        SectionBlock(text=MarkdownTextObject(text=_cut(_esc(event["text"]), 3000))),
    ]
    fields = _fields(event)
    if fields:
        blocks.append(SectionBlock(fields=fields))
    if event.get("items"):
        blocks.append(SectionBlock(text=MarkdownTextObject(text=_items_text(event))))
    if event.get("action_needed"):
        action = f"*Action needed:* {_esc(event['action_needed'])}"
        blocks.append(SectionBlock(text=MarkdownTextObject(text=_cut(action, 3000))))
    if event.get("url"):
        button = ButtonElement(
            text=PlainTextObject(text="Open in dashboard"),
            url=event["url"],
            action_id="open_dashboard",
            style="primary" if event.get("action_needed") else None,
        )
        blocks.append(ActionsBlock(elements=[button]))
    footer = f"Themis Update Manager · {event.get('occurred_at', '')}"
    if event.get("test"):
        footer += " · test message"
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=_esc(footer))]))
    return blocks


def slack_message(event: Mapping[str, Any]) -> dict[str, Any]:
    """An incoming-webhook body: `text` is the fallback shown in notifications."""
    blocks = slack_blocks(event)
    return {
        "text": _cut(_esc(f"{event['title']}: {event['text']}"), 3000),
        "blocks": [block.to_dict() for block in blocks],  # to_dict validates the limits
        "unfurl_links": False,
    }


class SlackChannel:
    def __init__(self, *, url: str, timeout: float = 5.0, send: HttpSend | None = None) -> None:
        self.url = url
        self._send = send or default_send(timeout=timeout)

    def send(self, event: Mapping[str, Any]) -> None:
        body = json.dumps(slack_message(event)).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
        _post(self._send, self.url, body, headers, "Slack")


# ------------------------------------------------------------------ PagerDuty


def pagerduty_event(event: Mapping[str, Any], *, routing_key: str) -> dict[str, Any]:
    """An Events API v2 body. One incident per rollout: the dedup_key is the
    notification's incident key, so triggers add alerts to the same incident."""
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": event["pagerduty_action"],
        "dedup_key": event["incident_key"],
    }
    if event["pagerduty_action"] != "trigger":
        return body
    details = {
        key: event[key]
        for key in ("release", "stage", "nodes", "node", "tenant", "verb", "items_total")
        if event.get(key) not in (None, "")
    }
    if event.get("rollout"):
        details["rollout"] = event["rollout"]
    if event.get("items"):
        details["items"] = list(event["items"])[:MAX_LISTED_ITEMS]
    details.update(event.get("details") or {})
    body["payload"] = {
        "summary": _cut(f"{event['title']}: {event['text']}", 1024),
        "source": event.get("source") or "themis-update-manager",
        "severity": event["severity"],
        "timestamp": event.get("occurred_at"),
        "component": event.get("component") or "themis",
        "group": event.get("tenant") or "fleet",
        "class": event["kind"],
        "custom_details": details,
    }
    body["client"] = "Themis Update Manager"
    if event.get("url"):
        body["client_url"] = event["url"]
        body["links"] = [{"href": event["url"], "text": "Open in Themis Update Manager"}]
    return body


class PagerDutyChannel:
    def __init__(
        self,
        *,
        routing_key: str,
        events_url: str = PAGERDUTY_EVENTS_URL,
        timeout: float = 5.0,
        send: HttpSend | None = None,
    ) -> None:
        self.routing_key = routing_key
        self.events_url = events_url
        self._send = send or default_send(timeout=timeout)

    def send(self, event: Mapping[str, Any]) -> None:
        if not event.get("pagerduty_action"):
            return  # nothing PagerDuty can act on; routing normally filters these out
        body = json.dumps(pagerduty_event(event, routing_key=self.routing_key)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        _post(self._send, self.events_url, body, headers, "PagerDuty")


# ------------------------------------------------------------- signed webhook


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>": the timestamp is signed too, so a
    captured request cannot be replayed later with a fresh timestamp."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (documented in the note); used by our tests."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class SignedWebhookChannel:
    def __init__(
        self,
        *,
        url: str,
        secret: str,
        timeout: float = 5.0,
        send: HttpSend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.secret = secret
        self._send = send or default_send(timeout=timeout)
        self._clock = clock

    def send(self, event: Mapping[str, Any]) -> None:
        body = json.dumps(dict(event), sort_keys=True, separators=(",", ":")).encode()
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_HEADER: str(event.get("kind", "")),
            DELIVERY_HEADER: str(event.get("id", "")),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        _post(self._send, self.url, body, headers, "Webhook")

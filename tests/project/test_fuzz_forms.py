"""Hostile values posted to every form and query filter, as every persona: never a 500, and a
refused request (4xx) leaves the database as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.db import models
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenants.models import Blackout, Consent, MaintenanceWindow, UpdatePolicy
from tests.conftest import Fleet
from updates.models import NodeCommand, Release, ReleaseFeed, Rollout, UpdateJob
from updates.notifications.models import Channel

# Values that broke forms elsewhere: huge and non-finite numbers, the ends of the calendar,
# malformed URLs, NUL bytes, path tricks, long unicode.
NASTY = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "0",
    str(2**63),
    str(-(2**63) - 1),
    str(10**400),
    "9999-12-31",
    "0001-01-01",
    "9999-12-31T23:59",
    "0001-01-01T00:00",
    "99:99",
    "1, nan, 100",
    "0, 50, 100",
    "100, 50",
    "https://[::1",
    "http://0x7f000001/",
    "https://169.254.169.254/latest",
    "javascript:alert(1)",
    "//evil.example/",
    "\x00",
    "a\x00b",
    "../../etc/passwd",
    "'; DROP TABLE updates_node; --",
    "🙂" * 200,
    "x" * 5000,
    "",
]
hostile = st.one_of(
    st.sampled_from(NASTY),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=120),
)

WATCHED: tuple[type[models.Model], ...] = (
    Release,
    Rollout,
    UpdateJob,
    NodeCommand,
    MaintenanceWindow,
    Blackout,
    UpdatePolicy,
    Consent,
    Channel,
    ReleaseFeed,
)


def snapshot() -> dict[str, int]:
    # Refused input may be audited (an Event) but must change nothing else.
    return {model.__name__: model._default_manager.count() for model in WATCHED}


@dataclass(frozen=True)
class Target:
    """A form or filter: its URL (from the fleet), method and field names."""

    name: str
    url: Callable[[Fleet], str]
    fields: tuple[str, ...]
    method: str = "post"


def _node(fleet: Fleet) -> str:
    return fleet.node_a.node_id


TARGETS = [
    Target("node_update", lambda f: reverse("node_update", args=[_node(f)]), ("release",)),
    Target("node_rollback", lambda f: reverse("node_rollback", args=[_node(f)]), ("point_id",)),
    Target(
        "event_list",
        lambda f: reverse("event_list"),
        ("tenant", "node", "verb", "actor", "since", "until", "cursor", "page"),
        "get",
    ),
    Target("event_node_search", lambda f: reverse("event_node_search"), ("node",), "get"),
    Target(
        "fleet",
        lambda f: reverse("fleet"),
        ("q", "tenant", "cluster", "status", "version", "sort", "page"),
        "get",
    ),
    Target(
        "fleet_poll",
        lambda f: reverse("fleet_poll"),
        ("q", "tenant", "cluster", "status", "sort", "page", "v", "page_sig", "summary_sig"),
        "get",
    ),
    Target(
        "rollout_new",
        lambda f: reverse("rollout_new"),
        (
            "release",
            "strategy",
            "cluster",
            "tenant",
            "version_filter",
            "stages",
            "max_error_rate",
            "max_p99_ms",
            "bake_seconds",
            "max_parallel",
            "max_unavailable",
            "health_timeout",
            "ack_timeout",
        ),
    ),
    Target(
        "cluster_switch_color",
        lambda f: reverse("cluster_switch_color", args=[f.cluster_a.pk]),
        ("next",),
    ),
    Target("tenant_calendar", lambda f: reverse("tenant_calendar"), ("week", "tz"), "get"),
    Target(
        "window_create",
        lambda f: reverse("window_create", args=[f.tenant_a.slug]),
        ("days", "start_time", "end_time", "timezone", "label"),
    ),
    Target(
        "blackout_create",
        lambda f: reverse("blackout_create", args=[f.tenant_a.slug]),
        ("name", "starts_local", "ends_local", "timezone", "yearly"),
    ),
    Target(
        "fleet_blackout_create",
        lambda f: reverse("fleet_blackout_create"),
        ("name", "starts_local", "ends_local", "timezone"),
    ),
    Target(
        "policy_update",
        lambda f: reverse("policy_update", args=[f.tenant_a.slug]),
        ("auto_update", "notify_lead_minutes", "consent_valid_days"),
    ),
    Target(
        "consent_decide",
        lambda f: reverse("consent_decide", args=[f.tenant_a.slug]),
        ("release", "decision", "reason", "valid_days"),
    ),
    Target(
        "channel_create",
        lambda f: reverse("notifications:channel_create"),
        ("name", "type", "tenant", "kinds", "url", "routing_key", "signing_secret"),
    ),
    Target(
        "release_feed_new",
        lambda f: reverse("release_feed_new"),
        ("name", "kind", "url", "product", "channel", "poll_interval_seconds", "enabled", "token"),
    ),
    Target(
        "delivery_list",
        lambda f: reverse("notifications:delivery_list"),
        ("channel", "status", "page"),
        "get",
    ),
]

PERSONAS = ["operator", "admin_a", "responder", "anonymous"]


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_input_never_answers_500_and_a_refusal_saves_nothing(
    target: Target, personas: dict[str, Client], fleet: Fleet, data: st.DataObject
) -> None:
    persona = data.draw(st.sampled_from(PERSONAS), label="persona")
    values = {name: data.draw(hostile, label=name) for name in target.fields}
    client = personas[persona]
    before = snapshot()
    url = target.url(fleet)
    # The test client raises any exception a view lets escape: that is the 500 we look for.
    send = client.get if target.method == "get" else client.post
    response = send(url, values)
    assert response.status_code < 500, (persona, values)
    if 400 <= response.status_code < 500:
        assert snapshot() == before, (persona, values)

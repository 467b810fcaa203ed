"""Details as a person reads them: known keys in words, no None, no raw dict or list."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.template import Context, Template
from django.utils import timezone

from updates.templatetags.readable import ago, readable, value_text


def test_an_events_details_read_as_words() -> None:
    html = str(
        readable(
            {
                "node_id": "a-1",
                "version": "1.7.0",
                "restore_point": None,
                "rollout_id": 7,
                "error_rate": 0.123456,
                "dry_run": False,
            }
        )
    )
    assert "{" not in html and "None" not in html and "restore point" not in html
    assert '<span class="detail-key">node</span> a-1' in html
    assert '<span class="detail-key">rollout</span> 7' in html
    assert '<span class="detail-key">error rate</span> 0.1235' in html
    assert '<span class="detail-key">dry run</span> no' in html
    assert html.count(" · ") == 4


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (["a", "b"], "a, b"),
        (list(range(12)), "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"),
        ({"max_p99_ms": 500, "skip": None}, "max p99 (ms) 500"),
        (True, "yes"),
        ("x" * 300, "x" * 199 + "…"),
    ],
)
def test_values(value: object, text: str) -> None:
    assert value_text(value) == text


def test_markup_in_details_is_escaped_and_empty_details_read_as_a_dash() -> None:
    html = Template("{% load readable %}{{ d|readable }}").render(
        Context({"d": {"reason": "<script>x</script>"}})
    )
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert str(readable({})) == "—" and str(readable(None)) == "—"


def test_a_moment_under_a_minute_ago_is_just_now() -> None:
    now = timezone.now()
    assert ago(now - timedelta(seconds=59)) == "just now"
    assert ago(now - timedelta(minutes=5, seconds=3)) == "5\xa0minutes ago"
    assert ago(None) == "never"

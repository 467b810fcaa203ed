"""Pages carry a strict Content-Security-Policy and pass it (no inline script or style);
repeated failed logins lock the username out from that address."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from tests.conftest import Fleet
from tests.factories import make_user

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
PAGES = [
    "fleet",
    "release_list",
    "rollout_list",
    "rollout_new",
    "event_list",
    "tenant_list",
    "tenant_calendar",
    "notifications:channel_list",
    "notifications:delivery_list",
]


class InlineFinder(HTMLParser):
    """Collects what a `script-src 'self'; style-src 'self'` policy would block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self._in_script_without_src = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style":
            self.blocked.append("<style> element")
        if tag == "script" and "src" not in names:
            self._in_script_without_src = True
        if "style" in names:
            self.blocked.append(f"style attribute on <{tag}>")
        self.blocked += [f"{name} handler on <{tag}>" for name in names if name.startswith("on")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script_without_src = False

    def handle_data(self, data: str) -> None:
        if self._in_script_without_src and data.strip():
            self.blocked.append("inline <script>")


@pytest.mark.parametrize("page", PAGES)
def test_pages_carry_a_strict_policy_and_pass_it(
    page: str, personas: dict[str, Client], fleet: Fleet
) -> None:
    response = personas["operator"].get(reverse(page))
    assert response.status_code == 200
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    finder = InlineFinder()
    finder.feed(response.content.decode())
    assert finder.blocked == []


def test_the_inline_finder_sees_what_the_policy_blocks() -> None:
    finder = InlineFinder()
    finder.feed('<div style="x"></div><script>alert(1)</script><style>a{}</style><a onclick="y">')
    assert finder.blocked == [
        "style attribute on <div>",
        "inline <script>",
        "<style> element",
        "onclick handler on <a>",
    ]


def test_failed_logins_lock_the_username_out_from_that_address(
    db: None, settings: Settings
) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    make_user(username="mallory-target", password="right-password-123")
    make_user(username="someone-else", password="other-password-456")
    client = Client(REMOTE_ADDR="203.0.113.9")
    login = reverse("login")
    statuses = [
        client.post(login, {"username": "mallory-target", "password": "guess"}).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]  # the form with its error, then the lockout
    locked = client.post(login, {"username": "mallory-target", "password": "right-password-123"})
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
    # Another username from the same address is not locked.
    other = Client(REMOTE_ADDR="203.0.113.9")
    ok = other.post(login, {"username": "someone-else", "password": "other-password-456"})
    assert ok.status_code == 302
    assert "_auth_user_id" in other.session


@pytest.mark.parametrize(
    "template",
    sorted(str(p.relative_to(TEMPLATES)) for p in TEMPLATES.rglob("*.html")),
)
def test_no_template_holds_what_the_policy_blocks(template: str) -> None:
    """Every template, not only the pages above: an inline handler the policy blocks does
    nothing in the browser (a confirmation that never asks), silently."""
    text = re.sub(r"\{#.*?#\}", "", (TEMPLATES / template).read_text())  # template comments
    finder = InlineFinder()
    finder.feed(text)
    assert finder.blocked == []

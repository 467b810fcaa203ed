"""Errors answer with the site's own pages (JSON under /api/), never Django's: 400, 403,
404, 405, 500 and a refused CSRF token; and `make run` serves with DEBUG off."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from django.test import Client, RequestFactory
from django.urls import reverse

from tests import procs
from tests.conftest import Fleet
from themis_dashboard import errors

pytestmark = pytest.mark.django_db


def _page(body: str, status: int) -> str:
    """The error section of a page, checked to be the site's."""
    assert 'class="topbar"' in body and "Themis Update Manager" in body
    assert f'data-status="{status}"' in body
    assert "Traceback" not in body and "URLconf" not in body and "Django" not in body
    return body[body.index('id="error-page"') :]


def test_an_unknown_address_is_the_sites_404_without_the_url_patterns(
    personas: dict[str, Client],
) -> None:
    response = personas["operator"].get("/no/such/page/")
    assert response.status_code == 404
    section = _page(response.content.decode(), 404)
    assert "Not found" in section and "another tenant" in section
    assert "api/v1/" not in response.content.decode()  # no list of URL patterns


def test_a_missing_object_is_the_same_404(personas: dict[str, Client]) -> None:
    response = personas["operator"].get(reverse("rollout_detail", args=[999_999]))
    assert response.status_code == 404
    _page(response.content.decode(), 404)


def test_a_role_without_the_permission_gets_the_sites_403(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    response = personas["admin_a"].get(reverse("rollout_new"))
    assert response.status_code == 403
    assert "Not allowed" in _page(response.content.decode(), 403)


def test_get_on_a_post_only_address_names_the_method_it_answers(
    personas: dict[str, Client],
) -> None:
    response = personas["operator"].get(reverse("logout"))
    assert response.status_code == 405
    section = _page(response.content.decode(), 405)
    assert "does not answer GET" in section and "POST" in section
    assert "POST" in response["Allow"]


def test_a_form_without_its_csrf_token_is_refused_with_words(fleet: Fleet) -> None:
    client = Client(enforce_csrf_checks=True)
    response = client.post(reverse("login"), {"username": "x", "password": "y"})
    assert response.status_code == 403
    section = _page(response.content.decode(), 403)
    assert "The form expired" in section and "nothing was changed" in section


def test_a_server_error_is_a_plain_page_and_json_under_the_api() -> None:
    page = errors.server_error(RequestFactory().get("/fleet/"))
    assert page.status_code == 500
    section = _page(page.content.decode(), 500)
    assert "the error is in the server" in section and "log" in section
    api = errors.server_error(RequestFactory().get("/api/v1/nodes/"))
    assert api.status_code == 500 and api["Content-Type"] == "application/json"
    assert json.loads(api.content)["code"] == "server_error"


def test_a_request_refused_before_any_view_is_a_plain_400() -> None:
    page = errors.bad_request(RequestFactory().get("/fleet/"), ValueError("bad host"))
    assert page.status_code == 400
    assert "could not be understood" in _page(page.content.decode(), 400)


def test_errors_under_the_api_are_json(personas: dict[str, Client]) -> None:
    response = personas["operator"].get("/api/v1/no-such-thing/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_make_run_serves_with_debug_off_unless_asked() -> None:
    code = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"

    def debug(**extra: str) -> str:
        environ = procs.inherited_env(drop=frozenset({"DATABASE_URL", "DEBUG"}))
        environ.update(extra, DJANGO_SETTINGS_MODULE="themis_dashboard.settings.local")
        result = subprocess.run(
            [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert debug() == "False"
    assert debug(DEBUG="1") == "True"

"""Live pages in a real browser: a running job's progress arrives through the page's event
stream (no poll could have brought it in time), and with Redis down the same page polls
and still shows it."""

from __future__ import annotations

import contextlib
import time

import pytest
from django.urls import reverse
from playwright.sync_api import APIResponse, Page, Route
from playwright.sync_api import Error as PlaywrightError
from pytest_django.fixtures import Settings
from pytest_django.live_server_helper import LiveServer

from tests.browser.test_operator_browser import _login, operator
from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from tests.procs import free_port
from updates.jobs import services as jobs
from updates.live import services as live
from updates.models import UpdateJob

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
__all__ = ["operator"]

STREAM = "#job-live"


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def running_job(fleet: Fleet, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> UpdateJob:
    # A publisher of its own: no back-off left from a test that ran without Redis.
    monkeypatch.setattr(live, "publisher", live.Publisher())
    job = jobs.job_start_update(node=fleet.node_a, release=make_release(), user=None)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=10)
    return job


def _open_job_page(page: Page, live_server: LiveServer, operator: str, job: UpdateJob) -> None:
    _login(page, live_server, operator)
    page.goto(f"{live_server.url}{reverse('node_job', args=['a-1', job.pk])}")
    page.wait_for_selector(f"{STREAM}:has-text('10 %')")


def _report(job: UpdateJob, percent: int) -> float:
    """What the node's agent reports; returns when."""
    sent = time.monotonic()
    assert jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=percent
    )
    return sent


def test_progress_arrives_through_the_pages_stream(
    page: Page, live_server: LiveServer, operator: str, running_job: UpdateJob
) -> None:
    _open_job_page(page, live_server, operator, running_job)
    region = page.locator("[sse-connect]")
    page.wait_for_selector("[sse-connect][data-live-state=open]")
    latencies = []
    for percent in (30, 55, 80):
        sent = _report(running_job, percent)
        page.wait_for_selector(f"{STREAM}:has-text('{percent} %')", timeout=5_000)
        latencies.append(time.monotonic() - sent)
        # Still open, so app.js never polled: the stream brought it (the slow poll beside
        # it is every 10 s, the waits above at most 5).
        assert region.get_attribute("data-live-state") == "open"
    assert max(latencies) < 5.0


def test_with_redis_down_the_page_polls_and_still_shows_progress(
    page: Page,
    live_server: LiveServer,
    operator: str,
    running_job: UpdateJob,
    settings: Settings,
) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # the server's streams: refused
    _open_job_page(page, live_server, operator, running_job)
    page.wait_for_selector("[sse-connect][data-live-state=down]")
    _report(running_job, 60)
    # The fast poll (every 500 ms while the stream is down), not the slow one (10 s).
    page.wait_for_selector(f"{STREAM}:has-text('60 %')", timeout=5_000)


def test_a_finished_jobs_page_lets_go_of_its_stream(
    page: Page, live_server: LiveServer, operator: str, running_job: UpdateJob
) -> None:
    _open_job_page(page, live_server, operator, running_job)
    page.wait_for_selector("[sse-connect][data-live-state=open]")
    jobs.job_finish(job_id=running_job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    page.wait_for_selector(f"{STREAM}:has-text('DONE')", timeout=5_000)
    # Not live any more: the stream's element is gone, so nothing asks for a new stream.
    page.wait_for_selector("[sse-connect]", state="detached", timeout=5_000)
    assert page.locator("#job-live[hx-get]").count() == 0


def test_a_change_announced_while_the_last_fetch_is_in_flight_still_shows(
    page: Page, live_server: LiveServer, operator: str, running_job: UpdateJob
) -> None:
    """The first fetch is answered late (held here after the server rendered it at 30 %);
    a second change arrives meanwhile. The part fetches again at once (hx-sync replace):
    with htmx's default the second fetch waited in the element's queue and was dropped when
    the late answer replaced the element, so 55 % showed only at the next slow poll."""
    _open_job_page(page, live_server, operator, running_job)
    page.wait_for_selector("[sse-connect][data-live-state=open]")
    page.wait_for_timeout(500)  # the stream's first `changed` fetched and settled
    held: list[tuple[Route, APIResponse]] = []

    def hold_the_first_fetch(route: Route) -> None:
        if not held and route.request.headers.get("hx-request"):
            held.append((route, route.fetch()))  # rendered now, answered later
        else:
            route.continue_()

    page.route(f"**{reverse('node_job', args=['a-1', running_job.pk])}", hold_the_first_fetch)
    _report(running_job, 30)
    page.wait_for_timeout(800)
    assert held, "the first change was fetched"
    _report(running_job, 55)
    page.wait_for_timeout(800)
    route, response = held[0]
    with contextlib.suppress(PlaywrightError):  # htmx aborted it for the newer fetch
        route.fulfill(response=response)
    page.wait_for_selector(f"{STREAM}:has-text('55 %')", timeout=4_000)

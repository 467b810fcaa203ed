"""What an operator meets when things go wrong, in a real browser: a failed canary says why on
its page, every refused field of the new-rollout form is named, error pages are the site's,
and a restore point taken before the first install is not offered."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import Page
from pytest_django.live_server_helper import LiveServer

from tenants.roles import OPERATOR, TENANT_ADMIN
from tests.browser_fixtures import screenshot
from tests.conftest import Fleet
from tests.factories import make_node, make_user
from tests.fakes import NullTransport

# The rollout views tests' release and three-node cluster.
from tests.rollouts.test_rollout_views import cluster_b, release
from updates.jobs import services as jobs
from updates.models import Cluster, Node, Release, Rollout, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts.tasks import drive_active_rollouts

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
__all__ = ["cluster_b", "release"]

PASSWORD = "correct horse battery staple"

# Field, a value the form refuses, and the words its error must carry.
REFUSED_FIELDS = [
    ("max_error_rate", "-1", "Max error rate"),
    ("max_p99_ms", "-5", "Max p99 latency (ms)"),
    ("bake_seconds", "-30", "Bake"),
    ("max_unavailable", "0", "Max unavailable"),
    ("max_parallel", "-2", "Max nodes at once"),
    ("health_timeout", "-1", "Health timeout"),
]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node side is not what these pages are about: commands go nowhere, and what an agent
    # would report is fed to the same service its report reaches.
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def operator(roles: None) -> str:
    make_user(username="olivia").groups.add(Group.objects.get(name=OPERATOR))
    return "olivia"


def _login(page: Page, live_server: LiveServer, username: str) -> None:
    page.goto(f"{live_server.url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def _fill_rollout(page: Page, live_server: LiveServer, release: Release, cluster: Cluster) -> None:
    page.goto(f"{live_server.url}{reverse('rollout_new')}")
    page.select_option("select[name=release]", str(release.pk))
    page.select_option("select[name=cluster]", str(cluster.pk))
    page.fill("input[name=stages]", "1, 100")


def test_a_failed_canary_says_why_on_its_page(
    page: Page,
    live_server: LiveServer,
    fleet: Fleet,
    operator: str,
    release: Release,
    cluster_b: Cluster,
) -> None:
    _login(page, live_server, operator)
    _fill_rollout(page, live_server, release, cluster_b)
    page.click("button[name=preview]")
    page.click("#start-rollout")
    page.wait_for_url(f"{live_server.url}/rollouts/*/")
    rollout = Rollout.objects.get()
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    # What the node's agent reports: its health URL answered 500, the update rolled back.
    jobs.job_finish(
        job_id=job.pk,
        node_id=job.node.node_id,
        ok=False,
        error_code="HEALTH_CHECK_FAILED_ROLLED_BACK",
        error_message="health URL answered 500",
    )
    coordinator.rollout_drive(rollout.pk)

    # The open page learns it without a reload.
    reason = page.locator("p.error", has_text="failed its update")
    reason.wait_for(timeout=10_000)
    text = reason.inner_text()
    assert job.node.node_id in text
    assert "HEALTH_CHECK_FAILED_ROLLED_BACK: health URL answered 500" in text
    row = page.locator(f"tr[data-node='{job.node.node_id}']")
    assert "health URL answered 500" in row.inner_text()
    screenshot(page, "rollout-failed-canary")


@pytest.mark.parametrize(("field", "value", "label"), REFUSED_FIELDS)
def test_every_refused_rollout_field_is_named_in_the_browser(
    page: Page,
    live_server: LiveServer,
    fleet: Fleet,
    operator: str,
    release: Release,
    cluster_b: Cluster,
    field: str,
    value: str,
    label: str,
) -> None:
    _login(page, live_server, operator)
    _fill_rollout(page, live_server, release, cluster_b)
    box = page.locator(f"input[name={field}]")
    box.fill(value)
    # The browser refuses it first, naming the field's limit...
    page.click("button[name=preview]")
    message = box.evaluate("element => element.validationMessage")
    assert message, f"{field}={value} was not refused by the browser"
    assert page.url.endswith(reverse("rollout_new"))
    # ...and the server names it too when the browser's check is bypassed.
    page.evaluate("document.querySelector('form.rollout-form').noValidate = true")
    page.click("button[name=preview]")
    named = page.locator(f"#form-errors [data-field='{field}']")
    named.wait_for()
    text = named.inner_text()
    assert label.lower() in text.lower()
    assert "greater than or equal to" in text
    assert not Rollout.objects.exists()


def test_error_pages_are_the_sites_own(
    page: Page, live_server: LiveServer, fleet: Fleet, operator: str, roles: None
) -> None:
    _login(page, live_server, operator)

    missing = page.goto(f"{live_server.url}/no/such/page/")
    assert missing is not None and missing.status == 404
    assert page.locator("#error-page").is_visible()
    assert "Not found" in page.locator("#error-page").inner_text()
    assert page.locator(".topbar").is_visible()
    assert "URLconf" not in page.content() and "api/v1/" not in page.content()
    screenshot(page, "error-404")

    wrong_method = page.goto(f"{live_server.url}{reverse('node_key_rotate', args=['a-1'])}")
    assert wrong_method is not None and wrong_method.status == 405
    assert page.locator("#error-page[data-status='405']").is_visible()

    # A tenant admin opening an operator's page.
    admin = make_user(username="alice")
    admin.groups.add(Group.objects.get(name=TENANT_ADMIN))
    fleet.tenant_a.admins.add(admin)
    page.context.clear_cookies()
    _login(page, live_server, "alice")
    forbidden = page.goto(f"{live_server.url}{reverse('rollout_new')}")
    assert forbidden is not None and forbidden.status == 403
    assert "Not allowed" in page.locator("#error-page[data-status='403']").inner_text()

    # A form posted after its CSRF cookie is gone (another tab logged out, say).
    page.context.clear_cookies()
    page.goto(f"{live_server.url}/login/")
    page.context.clear_cookies()
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.click("button[type=submit]")
    assert posted.value.status == 403
    page.wait_for_selector("#error-page[data-status='403']")
    assert "Django" not in page.content() and "CSRF" in page.content()
    screenshot(page, "error-csrf")


def test_a_point_taken_before_the_first_install_is_not_offered(
    page: Page, live_server: LiveServer, fleet: Fleet, operator: str
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(
        restore_points=[
            {"id": "p-empty", "version": "", "file_count": 0, "size": 0},
            {"id": "p-160", "version": "1.6.0", "file_count": 2, "size": 2048},
        ]
    )
    _login(page, live_server, operator)
    page.goto(f"{live_server.url}{reverse('node_detail', args=['a-1'])}")
    points = page.locator("#restore-points")
    assert "(before the first install)" in points.inner_text()
    assert page.locator("#restore-points a", has_text="Roll back").all_inner_texts() == [
        "Roll back to 1.6.0…"
    ]
    page.click("text=Roll back to 1.6.0…")
    page.click("text=Roll back to 1.6.0 now")
    page.wait_for_url(f"{live_server.url}{reverse('node_detail', args=['a-1'])}")
    row = page.locator("#jobs tr[data-state]").first
    assert "1.6.0" in row.inner_text() and "p-160" in row.inner_text()
    job = UpdateJob.objects.get()
    assert (job.kind, job.restore_point, job.restore_version) == ("rollback", "p-160", "1.6.0")


def test_a_sick_service_shows_on_its_fleet_tile_and_node_page(
    page: Page, live_server: LiveServer, fleet: Fleet, operator: str
) -> None:
    Node.objects.filter(node_id="a-1").update(
        service_healthy=True, error_rate=0.001, p99_latency_ms=40.0
    )
    _login(page, live_server, operator)
    tile = page.locator("[data-node='a-1']")
    assert tile.get_attribute("data-service") == "healthy"
    assert "service" not in tile.locator(".tile-status").inner_text()

    # The host stays online; the service's own health check starts failing. The open page
    # shows it at the next poll, without a reload.
    Node.objects.filter(node_id="a-1").update(service_healthy=False, error_rate=0.31)
    page.wait_for_selector("[data-node='a-1'][data-service='failing']", timeout=8_000)
    assert "Online · service failing" in tile.locator(".tile-status").inner_text()
    classes = tile.get_attribute("class") or ""
    assert "status-online" in classes
    # A slow one is degraded, with what is over which limit in its title.
    Node.objects.filter(node_id="a-solo").update(
        service_healthy=True, error_rate=0.0, p99_latency_ms=1800.0
    )
    slow = page.locator("[data-node='a-solo'][data-service='degraded']")
    slow.wait_for(timeout=8_000)
    assert "p99 latency 1800 ms above 500 ms" in (slow.get_attribute("title") or "")
    screenshot(page, "fleet-sick-service")

    page.click("[data-node='a-1']")
    health = page.locator("#service-health")
    assert health.get_attribute("data-service") == "failing"
    assert "Service failing" in health.inner_text() and "31.00%" in health.inner_text()
    screenshot(page, "node-sick-service")


def test_the_header_badge_shows_a_pending_consent_until_it_is_granted(
    page: Page, live_server: LiveServer, fleet: Fleet, roles: None, release: Release
) -> None:
    admin = make_user(username="alice")
    admin.groups.add(Group.objects.get(name=TENANT_ADMIN))
    fleet.tenant_a.admins.add(admin)
    UpdateJob.objects.create(
        node=fleet.node_a, release=release, state=UpdateJob.State.WAITING_FOR_CONSENT
    )
    _login(page, live_server, "alice")
    badge = page.locator("#inbox-badge")
    assert badge.inner_text() == "1"
    screenshot(page, "header-inbox-badge")

    page.click("#inbox-link")
    row = page.locator("[data-consent='tenant-a:themisdb 1.7.0']")
    assert "Tenant A" in row.inner_text()
    row.locator("text=Grant or decline…").click()
    page.wait_for_url("**/tenants/tenant-a/**")
    page.locator("#consents tr[data-release='1.7.0'] button[value=grant]").click()
    page.wait_for_selector("text=Consent for 1.7.0 granted.")
    # Granted: the job starts at the scheduler's next beat, nothing waits on the admin now.
    assert page.locator("#inbox-badge").count() == 0
    page.click("#inbox-link")
    assert "No node of your tenants waits for a consent." in page.inner_text("#inbox-consents")


def test_search_filter_and_roll_back_three_selected_nodes(
    page: Page, live_server: LiveServer, fleet: Fleet, operator: str
) -> None:
    for i in (2, 3):
        make_node(node_id=f"a-{i}", tenant=fleet.tenant_a, cluster=fleet.cluster_a)
    make_node(node_id="b-2", tenant=fleet.tenant_b)
    for node_id in ("a-1", "a-2", "a-3", "a-solo"):
        Node.objects.filter(node_id=node_id).update(
            installed_version="1.7.0",
            restore_points=[
                {"id": f"{node_id}-p160", "version": "1.6.0", "created": "2026-11-01T00:00:00"},
                {"id": f"{node_id}-p170", "version": "1.7.0", "created": "2026-11-20T00:00:00"},
            ],
        )
    Node.objects.filter(node_id="a-3").update(status=Node.Status.OFFLINE)
    _login(page, live_server, operator)

    # Tenant A's nodes whose name starts with "a-", online only: a-1, a-2, a-solo.
    page.fill("#fleet-filter input[name=q]", "a-")
    page.select_option("#fleet-filter select[name=tenant]", "tenant-a")
    page.click("#fleet-filter button[type=submit]")
    page.wait_for_url("**/?*tenant=tenant-a*")
    page.select_option("#fleet-filter select[name=status]", "online")
    page.click("#fleet-filter button[type=submit]")
    page.wait_for_url("**status=online*")
    shown = sorted(page.locator(".tile").evaluate_all("tiles => tiles.map(t => t.dataset.node)"))
    assert shown == ["a-1", "a-2", "a-solo"]

    page.click("text=Select all on this page")
    assert page.locator(".tile-pick:checked").count() == 3
    page.click("#bulk button[value=rollback]")
    page.wait_for_url("**/fleet/bulk/**")
    steps = page.locator("#bulk-steps tr[data-node]")
    assert steps.count() == 3
    assert "1.7.0 → 1.6.0 (point a-2-p160)" in page.inner_text("#bulk-steps tr[data-node='a-2']")
    assert not UpdateJob.objects.exists()
    screenshot(page, "fleet-bulk-rollback-confirm")

    page.click("text=Roll back these nodes now")
    page.wait_for_selector("#bulk-outcomes")
    started = page.locator("#bulk-outcomes tr[data-started='yes']")
    assert started.count() == 3
    jobs_started = sorted(
        UpdateJob.objects.filter(kind=UpdateJob.Kind.ROLLBACK).values_list(
            "node__node_id", "restore_point"
        )
    )
    assert jobs_started == [("a-1", "a-1-p160"), ("a-2", "a-2-p160"), ("a-solo", "a-solo-p160")]


def test_a_scheduled_rollout_starts_on_time(
    page: Page,
    live_server: LiveServer,
    fleet: Fleet,
    operator: str,
    release: Release,
    cluster_b: Cluster,
) -> None:
    _login(page, live_server, operator)
    _fill_rollout(page, live_server, release, cluster_b)
    # Whole seconds, as the field takes them, at least 3 s ahead of the click.
    start_at = (timezone.now() + timedelta(seconds=4)).replace(microsecond=0)
    page.fill("input[name=start_at]", f"{start_at:%Y-%m-%dT%H:%M:%S}")
    page.click("button[name=preview]")
    page.click("#start-rollout")
    page.wait_for_url(f"{live_server.url}/rollouts/*/")
    assert "Starts at" in page.inner_text("#rollout-schedule")
    assert page.inner_text("#rollout-state") == "PLANNED"
    rollout = Rollout.objects.get()
    assert rollout.start_at == start_at and not UpdateJob.objects.exists()

    # The coordinator's beat, every half second here (every THEMIS_ROLLOUT_REAPER_SECONDS
    # in service), until the rollout runs or a deadline passes.
    deadline = time.monotonic() + 15
    while Rollout.objects.get().state == Rollout.State.PLANNED:
        assert time.monotonic() < deadline, "the scheduled rollout never started"
        drive_active_rollouts()
        time.sleep(0.5)
    rollout.refresh_from_db()
    assert rollout.started_at is not None
    assert start_at <= rollout.started_at < start_at + timedelta(seconds=1.5)
    # The open page shows it running without a reload.
    page.wait_for_selector("#rollout-state:text('RUNNING')", timeout=5_000)
    assert "started" in page.inner_text("#rollout-schedule")
    screenshot(page, "rollout-scheduled-started")

"""An operator signs in with a real browser and watches the fleet change live."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone
from playwright.sync_api import Page
from pytest_django.live_server_helper import LiveServer

from tenants.roles import OPERATOR, TENANT_ADMIN
from tests.browser_fixtures import screenshot
from tests.conftest import Fleet
from tests.factories import NodeFactory, make_release, make_user
from tests.fakes import NullTransport
from updates.fleet.selectors import FLEET_PAGE_SIZE
from updates.jobs import services as jobs
from updates.models import Node, NodeComponent, UpdateJob

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery staple"


def _login(page: Page, live_server: LiveServer, username: str) -> None:
    page.goto(f"{live_server.url}/")
    assert "/login/" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def test_operator_sees_fleet_update_live(
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
    user = make_user(username="olivia")
    user.groups.add(Group.objects.get(name=OPERATOR))
    _login(page, live_server, "olivia")

    for node_id in ("a-1", "a-solo", "b-1"):
        assert page.locator(f"[data-node='{node_id}']").is_visible()
    tile = page.locator("[data-node='b-1']")
    classes = tile.get_attribute("class")
    assert classes is not None
    assert "status-online" in classes

    # A change in the database reaches the open page without a reload.
    Node.objects.filter(node_id="b-1").update(status=Node.Status.OFFLINE, installed_version="1.7.1")
    page.wait_for_selector("[data-node='b-1'].status-offline", timeout=6_000)
    assert "1.7.1" in page.locator("[data-node='b-1']").inner_text()
    screenshot(page, "fleet-operator")

    page.click("[data-node='a-1']")
    page.wait_for_url(f"{live_server.url}/nodes/a-1/")
    assert page.locator("h1").inner_text() == "a-1"


def test_the_table_view_changes_live_and_selects_nodes_for_an_action(
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
    make_user(username="olivia").groups.add(Group.objects.get(name=OPERATOR))
    _login(page, live_server, "olivia")
    page.click("text=Show as a table")
    page.wait_for_selector("#fleet-table tr#row-b-1")
    assert page.locator("#fleet-table tbody tr").count() == 3
    # A changed node's row is swapped in place by the live poll, like a tile.
    Node.objects.filter(node_id="b-1").update(status=Node.Status.OFFLINE, installed_version="1.7.1")
    page.wait_for_selector("#fleet-table tr#row-b-1.status-offline", timeout=6_000)
    assert "1.7.1" in page.locator("#row-b-1").inner_text()
    assert page.locator("#fleet-table tbody tr").count() == 3  # swapped, not added
    screenshot(page, "fleet-table")
    page.check("#row-a-1 input.tile-pick")
    page.check("#row-b-1 input.tile-pick")
    page.click("#bulk button[value=end_job]")
    page.wait_for_selector("#bulk-steps")
    assert page.locator("#bulk-steps tr[data-node]").count() == 2


def test_operator_searches_and_pages_through_a_large_fleet(
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
    Node.objects.bulk_create(
        NodeFactory.build(node_id=f"n{i:04d}", tenant=fleet.tenant_b, status="online")
        for i in range(130)
    )
    user = make_user(username="olivia")
    user.groups.add(Group.objects.get(name=OPERATOR))
    _login(page, live_server, "olivia")

    tiles = page.locator("#fleet-nodes .tile")
    assert tiles.count() == FLEET_PAGE_SIZE
    assert "Nodes 1–100 of 133" in page.locator("#fleet-nodes").inner_text()
    page.click("#fleet-nodes a[rel=next]")
    page.wait_for_url(f"{live_server.url}/?page=2")
    assert tiles.count() == 33
    assert page.locator("[data-node='n0129']").is_visible()

    page.fill("input[name=q]", "n012")
    page.select_option("select[name=sort]", "-node")
    page.click("#fleet-filter button[type=submit]")
    page.wait_for_url(f"{live_server.url}/?q=n012&tenant=&status=&version=&tag=&sort=-node")
    assert page.locator("#fleet-nodes .tile").evaluate_all(
        "tiles => tiles.map(t => t.dataset.node)"
    ) == [f"n{i:04d}" for i in range(129, 119, -1)]

    # The searched view stays live: a node that fails turns red without a reload, and the
    # tenant breakdown the operator opened stays open while its counts change.
    page.click(".summary-tenants summary")
    Node.objects.filter(node_id="n0125").update(status=Node.Status.FAILED)
    page.wait_for_selector("[data-node='n0125'].status-failed", timeout=6_000)
    assert "1 failed" in page.locator("#fleet-counts").inner_text()
    assert "Tenant B 131 1 failed" in page.locator("#fleet-tenant-counts").inner_text()
    assert page.locator(".summary-tenants").get_attribute("open") is not None
    screenshot(page, "fleet-search")


def test_tenant_admin_sees_only_own_tenant(
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
    user = make_user(username="alice")
    user.groups.add(Group.objects.get(name=TENANT_ADMIN))
    fleet.tenant_a.admins.add(user)
    _login(page, live_server, "alice")
    assert page.locator("[data-node='a-1']").is_visible()
    assert page.locator("[data-node='b-1']").count() == 0
    response = page.goto(f"{live_server.url}/nodes/b-1/")
    assert response is not None
    assert response.status == 404


def test_operator_reviews_a_multi_component_plan_then_confirms(
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)
    NodeComponent.objects.record(
        node_id=fleet.node_a.pk,
        versions={"themisdb": "1.0.0", "themis-storage": "1.3.0"},
        now=timezone.now(),
        replace=True,
    )
    storage = make_release(product="themis-storage", version="1.4.2", sha256="ab" * 32)
    server = make_release(
        product="themisdb",
        version="1.5.0",
        sha256="cd" * 32,
        manifest={"dependencies": [{"product": "themis-storage", "constraint": ">=1.4"}]},
    )
    user = make_user(username="olivia")
    user.groups.add(Group.objects.get(name=OPERATOR))
    _login(page, live_server, "olivia")

    page.goto(f"{live_server.url}/nodes/a-1/")
    components = page.locator("#components")
    assert "themis-storage 1.3.0" in components.inner_text()
    page.select_option("select[name=release]", str(server.pk))
    page.click("text=Start update…")
    page.wait_for_selector("#plan-steps")
    steps = page.locator("#plan-steps li").all_inner_texts()
    assert steps == ["themis-storage 1.3.0 → 1.4.2", "themisdb 1.0.0 → 1.5.0"]
    assert not UpdateJob.objects.exists()  # nothing starts before the confirmation
    screenshot(page, "node-update-plan")

    page.click("#confirm-update")
    page.wait_for_url(f"{live_server.url}/nodes/a-1/")
    job = UpdateJob.objects.get()
    assert job.plan_release_ids == {storage.pk, server.pk}

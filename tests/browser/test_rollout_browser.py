"""The product in a real browser: an operator publishes a release and starts a
canary on a 3-node cluster; an on-call responder approves; every node, real
agent processes included, reaches the new version with the leader last."""

from __future__ import annotations

import contextlib

import pytest
from django.contrib.auth.models import Group
from playwright.sync_api import Page
from pytest_django.live_server_helper import LiveServer

from tenants.roles import OPERATOR, RESPONDER
from tests.browser_fixtures import screenshot
from tests.factories import make_cluster, make_node, make_tenant, make_user
from tests.fleet_stack import StartFleet, service_release
from tests.helpers import MakeBundle, tree
from tests.service_load import LoadGenerator
from updates.models import Event, Node, Rollout

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery staple"


def _login(page: Page, live_server: LiveServer, username: str) -> None:
    page.goto(f"{live_server.url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def test_canary_with_approval_in_the_browser(
    page: Page,
    live_server: LiveServer,
    roles: None,
    real_fleet: StartFleet,
    make_bundle: MakeBundle,
    request: pytest.FixtureRequest,
) -> None:
    make_user(username="olivia").groups.add(Group.objects.get(name=OPERATOR))
    make_user(username="rita").groups.add(Group.objects.get(name=RESPONDER))
    tenant = make_tenant(name="Acme Analytics", slug="acme")
    cluster = make_cluster(tenant=tenant, name="acme-main")
    nodes = [
        make_node(
            node_id=f"acme-db-{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.6.0",
            raft_role="leader" if i == 1 else "follower",
        )
        for i in range(3)
    ]
    # Each node runs the demo service under its supervisor, with clients on it throughout.
    real = real_fleet(nodes, services=True)
    bundle = make_bundle("1.7.0", files=service_release("1.7.0"))
    loads = {
        node.node_id: LoadGenerator("127.0.0.1", port, connections=2, pause=0.02)
        for node in nodes
        for port in [real.service_ports[node.node_id]]
    }
    clients = contextlib.ExitStack()
    request.addfinalizer(clients.close)  # stopped even when an assertion fails
    for load in loads.values():
        clients.enter_context(load)
    before = {node_id: load.report.pids() for node_id, load in loads.items()}

    # The operator publishes the release: verified on upload.
    _login(page, live_server, "olivia")
    page.click("text=Releases")
    page.set_input_files("input[name=bundle]", str(bundle))
    page.click("text=Verify and publish")
    page.wait_for_selector("text=Published themisdb 1.7.0")

    # ...plans a canary on the cluster, sees the plan, starts it.
    page.click("text=Rollouts")
    page.click("text=New rollout")
    page.select_option("select[name=release]", label="themisdb 1.7.0")
    page.select_option("select[name=strategy]", value="canary")
    page.select_option("select[name=cluster]", label="acme-main")
    page.click("button[name=preview]")
    page.wait_for_selector("#plan")
    assert "acme-db-1" in page.locator("#plan tbody tr").last.inner_text()  # leader last
    page.click("#start-rollout")
    page.wait_for_selector("#rollout-state")
    rollout = Rollout.objects.get()
    page.wait_for_selector("#rollout-state:text('AWAITING_APPROVAL')", timeout=120_000)
    screenshot(page, "rollout-awaiting-approval")
    page.click("button.link")  # log out

    # The on-call responder approves the promotion to 100 %.
    _login(page, live_server, "rita")
    page.goto(f"{live_server.url}/rollouts/{rollout.pk}/")
    page.click("#approve")
    page.wait_for_selector("#rollout-state:text('COMPLETED')", timeout=120_000)
    screenshot(page, "rollout-completed")

    reports = {node_id: load.stop() for node_id, load in loads.items()}
    for node in nodes:
        assert tree(real.install(node)) == service_release("1.7.0")
        report = reports[node.node_id]
        # /version changed because the process changed, and no client saw a failure.
        assert report.failed == 0, (node.node_id, report.failures)
        first, *later = report.pids()
        assert before[node.node_id] in ([], [first]) and later, report.pids()
        served = {pid: {v for _t, p, v in report.answers if p == pid} for pid in report.pids()}
        assert served[first] == {"1.6.0"} and served[later[-1]] == {"1.7.0"}
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.7.0"}
    done = Event.objects.filter(verb="job.done", details__rollout_id=rollout.pk).order_by("id")
    assert [e.details["node_id"] for e in done][-1] == "acme-db-1"
    approval = rollout.decisions.get(decision="approved")
    assert approval.decided_by_label == "rita"

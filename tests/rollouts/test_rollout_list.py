"""The rollouts list: filters in the query string (a bad one named and left out) and, per
release listed, what its updates did on the nodes the user may see."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_node, make_release, make_user
from updates.models import Node, Release, Rollout, UpdateJob
from updates.rollouts import selectors

pytestmark = pytest.mark.django_db
S = UpdateJob.State


def _listed(client: Client, **query: str) -> list[int]:
    body = client.get(reverse("rollout_list"), query).content.decode()
    table = body[body.index('id="rollouts"') :]
    table = table[: table.index("</table>")]
    return [int(chunk.split('"', 1)[0]) for chunk in table.split('data-rollout="')[1:]]


@pytest.fixture
def rollouts(fleet: Fleet) -> dict[str, Rollout]:
    old = make_release(version="1.6.0", sha256="aa" * 32)
    new = make_release(version="1.7.0", sha256="bb" * 32)
    made = {
        "done": Rollout.objects.create(release=old, strategy="rolling", state="COMPLETED"),
        "running": Rollout.objects.create(release=new, strategy="canary", state="RUNNING"),
        "planned": Rollout.objects.create(
            release=new,
            strategy="canary",
            state="PLANNED",
            start_at=timezone.now() + timedelta(hours=2),
        ),
    }
    return made


def test_the_list_filters_by_phase_state_strategy_and_version(
    personas: dict[str, Client], rollouts: dict[str, Rollout]
) -> None:
    client = personas["operator"]
    done, running, planned = (rollouts[k].pk for k in ("done", "running", "planned"))
    assert _listed(client) == [planned, running, done]
    assert _listed(client, sort="oldest") == [done, running, planned]
    assert _listed(client, phase="active") == [running]
    assert _listed(client, phase="finished") == [done]
    assert _listed(client, phase="planned") == [planned]
    assert _listed(client, state="COMPLETED") == [done]
    assert _listed(client, strategy="canary") == [planned, running]
    assert _listed(client, version="1.7") == [planned, running]
    assert _listed(client, version="2") == []
    page = client.get(reverse("rollout_list"), {"phase": "planned"}).content.decode()
    assert "starts " in page and " UTC</small>" in page


def test_a_bad_filter_is_named_and_left_out(
    personas: dict[str, Client], rollouts: dict[str, Rollout]
) -> None:
    response = personas["operator"].get(reverse("rollout_list"), {"state": "BOGUS"})
    assert response.status_code == 200
    assert "State: Select a valid choice" in response.content.decode()
    assert len(_listed(personas["operator"], state="BOGUS")) == 3


def _job(node: Node, release: Release, state: str, seconds: int | None = None) -> None:
    finished = timezone.now()
    UpdateJob.objects.create(
        node=node,
        release=release,
        state=state,
        started_at=finished - timedelta(seconds=seconds) if seconds else None,
        finished_at=finished if seconds else None,
    )


def test_each_release_says_how_its_updates_went(
    personas: dict[str, Client], fleet: Fleet, rollouts: dict[str, Rollout]
) -> None:
    new = rollouts["running"].release
    for node, seconds in [(fleet.node_a, 10), (fleet.node_a_standalone, 30), (fleet.node_b, 20)]:
        _job(node, new, S.DONE, seconds)
    others = [make_node(node_id=f"x-{i}", tenant=fleet.tenant_b) for i in range(4)]
    for node, state in zip(others, [S.FAILED, S.LOST, S.ROLLED_BACK, S.DOWNLOADING], strict=True):
        _job(node, new, state)
    body = personas["operator"].get(reverse("rollout_list")).content.decode()
    row = body[body.index('data-release="1.7.0"') :]
    row = row[: row.index("</tr>")]
    cells = [c.split("</td>")[0] for c in row.split("<td>")[1:]]
    assert cells == ["themisdb 1.7.0", "3", "2", "1", "1", "50 %", "20 s"]


def test_a_tenant_admin_counts_only_the_nodes_of_their_tenants(
    fleet: Fleet, rollouts: dict[str, Rollout]
) -> None:
    new = rollouts["running"].release
    _job(fleet.node_a, new, S.DONE, 12)
    _job(fleet.node_b, new, S.FAILED)
    alice = make_user(username="alice-only")
    fleet.tenant_a.admins.add(alice)
    [mine] = selectors.release_outcomes(alice, [new])
    assert (mine.updated, mine.failed, mine.median_seconds) == (1, 0, 12.0)
    stranger = make_user(username="nobody")
    assert selectors.release_outcomes(stranger, [new]) == []

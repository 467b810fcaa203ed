"""Update plans: a job to a release that needs other components carries every step, in
order, resolved from the node's components and the published releases; a plan that cannot
be made refuses the job whole, with the resolver's explanation."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_node, make_release
from updates.engine.resolve import UpdatePlan, resolve
from updates.jobs import selectors as plans
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, NodeComponent, Release, UpdateJob

pytestmark = pytest.mark.django_db


class NoTransport:
    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        pass

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        pass

    def health_check(self, node_id: str) -> dict[str, Any]:
        return {}


def _needs(*deps: dict[str, Any]) -> dict[str, Any]:
    return {"dependencies": list(deps)}


def _release(product: str, version: str, **fields: Any) -> Release:
    return make_release(product=product, version=version, sha256="ab" * 32, **fields)


@pytest.fixture
def catalogue(db: None) -> dict[str, Release]:
    """themisdb 1.5.0 needs storage >=1.4 and query >=1.4; older and deprecated ones too."""
    return {
        "storage-1.3": _release("themis-storage", "1.3.0"),
        "storage-1.4": _release("themis-storage", "1.4.2"),
        "storage-1.9": _release("themis-storage", "1.9.0", state=Release.State.DEPRECATED),
        "query-1.4": _release("themis-query", "1.4.5"),
        "server-1.5": _release(
            "themisdb",
            "1.5.0",
            manifest=_needs(
                {"product": "themis-storage", "constraint": ">=1.4,<2"},
                {"product": "themis-query", "constraint": ">=1.4"},
            ),
        ),
    }


@pytest.fixture
def node(fleet: Fleet) -> Node:
    node = fleet.node_a
    Node.objects.filter(pk=node.pk).update(installed_version="1.4.0")
    node.refresh_from_db()
    NodeComponent.objects.record(
        node_id=node.pk,
        versions={"themisdb": "1.4.0", "themis-storage": "1.3.0"},
        now=timezone.now(),
        replace=True,
    )
    return node


def _start(node: Node, release: Release) -> UpdateJob:
    return jobs.job_start_update(node=node, release=release, user=None, transport=NoTransport())


def test_a_job_stores_every_step_dependencies_first(
    node: Node, catalogue: dict[str, Release]
) -> None:
    job = _start(node, catalogue["server-1.5"])
    job.refresh_from_db()
    assert job.plan == [
        {"product": "themis-query", "version": "1.4.5", "from_version": "",
         "release_id": catalogue["query-1.4"].pk},
        {"product": "themis-storage", "version": "1.4.2", "from_version": "1.3.0",
         "release_id": catalogue["storage-1.4"].pk},
        {"product": "themisdb", "version": "1.5.0", "from_version": "1.4.0",
         "release_id": catalogue["server-1.5"].pk},
    ]  # fmt: skip
    # The deprecated storage 1.9.0 is newer, but no plan may use it.
    assert job.plan_release_ids == {
        catalogue["query-1.4"].pk,
        catalogue["storage-1.4"].pk,
        catalogue["server-1.5"].pk,
    }
    event = Event.objects.get(verb="job.update.queued")
    assert event.details["plan"] == ["themis-query 1.4.5", "themis-storage 1.4.2", "themisdb 1.5.0"]


def test_a_release_with_no_dependencies_is_a_single_step(fleet: Fleet) -> None:
    release = _release("themisdb", "1.7.0")
    job = _start(fleet.node_a, release)
    assert [(s["product"], s["from_version"]) for s in job.plan] == [("themisdb", "1.0.0")]


def test_an_unmet_dependency_refuses_the_job_and_leaves_nothing(
    node: Node, catalogue: dict[str, Release]
) -> None:
    Release.objects.filter(pk=catalogue["query-1.4"].pk).update(state=Release.State.DEPRECATED)
    with pytest.raises(jobs.PlanRefused) as refused:
        _start(node, catalogue["server-1.5"])
    assert "themis-query" in refused.value.explanation
    assert str(refused.value).startswith("no update plan takes a-1 to themisdb 1.5.0: ")
    assert not UpdateJob.objects.exists()
    assert not NodeCommand.objects.exists()
    assert not Event.objects.filter(verb__startswith="job.").exists()


def test_a_dependency_cycle_refuses_the_job_naming_it(fleet: Fleet) -> None:
    _release("themis-storage", "2.0.0", manifest=_needs({"product": "themis-query"}))
    _release("themis-query", "2.0.0", manifest=_needs({"product": "themis-storage"}))
    server = _release(
        "themisdb", "2.0.0", manifest=_needs({"product": "themis-storage", "constraint": ">=2"})
    )
    with pytest.raises(jobs.PlanRefused, match="cycle"):
        _start(fleet.node_a, server)
    assert not UpdateJob.objects.exists()


def test_an_unreadable_version_on_the_node_refuses_the_job(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(installed_version="not-a-version")
    fleet.node_a.refresh_from_db()
    with pytest.raises(jobs.PlanRefused, match="not a version"):
        _start(fleet.node_a, _release("themisdb", "1.7.0"))
    assert not UpdateJob.objects.exists()


def test_a_done_job_moves_every_component_of_its_plan(
    node: Node, catalogue: dict[str, Release]
) -> None:
    job = _start(node, catalogue["server-1.5"])
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.5.0"})
    assert plans.node_installed_versions(Node.objects.get(pk=node.pk)) == {
        "themisdb": "1.5.0",
        "themis-storage": "1.4.2",
        "themis-query": "1.4.5",
    }


def test_a_done_plan_without_version_to_still_moves_the_server_version(
    node: Node, catalogue: dict[str, Release]
) -> None:
    job = _start(node, catalogue["server-1.5"])
    # A plan's final report lists its steps; it names no version_to.
    report = {"plan": [{"product": s["product"], "version": s["version"], "state": "applied"}
                       for s in job.plan]}  # fmt: skip
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result=report)
    assert Node.objects.get(pk=node.pk).installed_version == "1.5.0"


def test_a_job_of_another_component_leaves_the_server_version(
    node: Node, catalogue: dict[str, Release]
) -> None:
    job = _start(node, catalogue["storage-1.4"])
    assert [s["product"] for s in job.plan] == ["themis-storage"]
    # Even if the report says version_to, it is not the server's.
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.4.2"})
    node.refresh_from_db()
    assert node.installed_version == "1.4.0"
    assert plans.node_installed_versions(node)["themis-storage"] == "1.4.2"


def test_a_node_without_components_runs_its_installed_version_as_themisdb(
    fleet: Fleet,
) -> None:
    assert plans.node_installed_versions(fleet.node_b) == {"themisdb": "1.0.0"}
    rows = plans.node_components(fleet.node_b)
    assert [(r.product, r.version, r.primary) for r in rows] == [("themisdb", "1.0.0", True)]


def test_the_step_labels_say_what_changes(node: Node, catalogue: dict[str, Release]) -> None:
    preview = plans.job_plan_preview(node=node, release=catalogue["server-1.5"])
    assert preview.plan is not None
    assert preview.plan.labels == (
        "themis-query (new) 1.4.5",
        "themis-storage 1.3.0 → 1.4.2",
        "themisdb 1.4.0 → 1.5.0",
    )


def test_installed_conflicts_read_the_installed_releases_manifests(node: Node) -> None:
    _release(
        "themis-storage",
        "1.3.0",
        manifest=_needs({"product": "themisdb", "constraint": ">=1.5"}),
    )
    assert plans.node_component_conflicts(node) == [
        "themis-storage 1.3.0 needs themisdb >=1.5, but themisdb 1.4.0 is installed"
    ]


def test_a_malformed_stored_manifest_is_never_a_candidate(fleet: Fleet) -> None:
    broken = _release("themisdb", "1.8.0", manifest={"dependencies": "themis-storage"})
    with pytest.raises(jobs.PlanRefused, match="dependencies is not a list"):
        _start(fleet.node_a, broken)
    assert not UpdateJob.objects.exists()


def test_alike_nodes_are_resolved_once_and_grouped(
    fleet: Fleet, catalogue: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [make_node(node_id=f"alike-{i}", installed_version="1.4.0") for i in range(40)]
    for node in nodes[:30]:
        NodeComponent.objects.record(
            node_id=node.pk, versions={"themis-storage": "1.3.0"}, now=timezone.now(), replace=True
        )
    calls: list[str] = []

    def counted(target: str, version: str | None, *rest: Any) -> UpdatePlan:
        calls.append(target)
        return resolve(target, version, *rest)

    monkeypatch.setattr(plans, "resolve", counted)
    groups = plans.plan_groups_for_nodes(catalogue["server-1.5"], nodes)
    assert len(calls) == 2
    assert [len(g.node_ids) for g in groups] == [30, 10]
    assert groups[0].labels[1] == "themis-storage 1.3.0 → 1.4.2"
    # Without storage, the release brings it in new.
    assert groups[1].labels[1] == "themis-storage (new) 1.4.2"


def test_a_release_the_node_already_runs_is_still_the_jobs_step(fleet: Fleet) -> None:
    release = _release("themisdb", "1.0.0")
    job = _start(fleet.node_a, release)
    assert [(s.label, s.release_id) for s in job.plan_steps] == [
        ("themisdb 1.0.0 → 1.0.0", release.pk)
    ]


# ------------------------------------------------------------------ many nodes at once


def test_a_plan_resolver_gives_each_node_the_plan_job_plan_resolve_gives(
    catalogue: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = catalogue["server-1.5"]
    alike = [make_node(node_id=f"alike-{i}", installed_version="1.0.0") for i in range(4)]
    ahead = make_node(node_id="ahead", installed_version="1.0.0")
    NodeComponent.objects.record(
        node_id=ahead.pk, versions={"themis-storage": "1.4.2"}, now=timezone.now(), replace=False
    )
    broken = make_node(node_id="broken", installed_version="not-a-version")
    nodes = [*alike, ahead, broken]
    expected: dict[str, plans.JobPlan | str] = {}
    for node in nodes:
        try:
            expected[node.node_id] = plans.job_plan_resolve(node=node, release=server)
        except plans.PlanUnresolvable as failed:
            expected[node.node_id] = failed.explanation

    resolved: list[dict[str, str]] = []
    real_resolve = plans._resolve

    def counting(release: Release, installed: Any, available: Any) -> plans.JobPlan:
        resolved.append(dict(installed))
        return real_resolve(release, installed, available)

    monkeypatch.setattr(plans, "_resolve", counting)
    resolver = plans.PlanResolver(server)
    resolver.prefetch(nodes)
    got: dict[str, plans.JobPlan | str] = {}
    for node in [*nodes, *nodes]:  # each asked twice, as two drives' batches would
        try:
            got[node.node_id] = resolver(node=node, release=server)
        except plans.PlanUnresolvable as failed:
            got[node.node_id] = failed.explanation
    assert got == expected
    assert isinstance(got["broken"], str) and "not a version" in got["broken"]
    # One resolution per combination of installed versions: alike, ahead, broken.
    assert len(resolved) == 3


def test_a_plan_resolver_reads_the_releases_and_components_once(
    catalogue: dict[str, Release], django_assert_max_num_queries: Any
) -> None:
    server = catalogue["server-1.5"]
    nodes = [make_node(node_id=f"q-{i}", installed_version="1.0.0") for i in range(30)]
    resolver = plans.PlanResolver(server)
    # The components of every node, then the published releases: two queries for 30 nodes.
    with django_assert_max_num_queries(2):
        resolver.prefetch(nodes)
        for node in nodes:
            assert resolver(node=node, release=server).labels == (
                "themis-query (new) 1.4.5",
                "themis-storage (new) 1.4.2",
                "themisdb 1.0.0 → 1.5.0",
            )


def test_a_plan_resolver_asked_for_another_release_resolves_it_afresh(
    catalogue: dict[str, Release],
) -> None:
    node = make_node(node_id="other", installed_version="1.0.0")
    resolver = plans.PlanResolver(catalogue["server-1.5"])
    storage = catalogue["storage-1.4"]
    assert resolver(node=node, release=storage) == plans.job_plan_resolve(
        node=node, release=storage
    )

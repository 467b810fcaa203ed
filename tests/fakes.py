"""Simulated node agents that answer instantly, for coordinator tests and the
coordinator benchmark. They act as real agents would, through the same
services the coordinator's tasks call (progress, finish), never by writing
rows directly; the one exception, `finish_queued_updates_in_bulk`, is for
simulations of tens of thousands of nodes and is checked against them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Subquery
from django.utils import timezone

from updates.jobs.services import job_finish, job_record_progress
from updates.models import PRIMARY_PRODUCT, Node, NodeCommand, RolloutNode, UpdateJob

# node_id -> error message: the update of that node fails its health check
Failures = dict[str, str]


def answer_queued_jobs(
    *,
    failures: Failures | None = None,
    on_done: Callable[[UpdateJob], None] | None = None,
    contract_failures: Failures | None = None,
) -> int:
    """Play every QUEUED job to its end, as its node's agent would. A contract job of a
    node named in `contract_failures` fails with that message."""
    failures = failures or {}
    answered = 0
    for job in UpdateJob.objects.filter(state=UpdateJob.State.QUEUED).select_related(
        "node", "release"
    ):
        node_id = job.node.node_id
        if job.kind == UpdateJob.Kind.CONTRACT:
            _answer_contract(job, (contract_failures or {}).get(node_id))
            answered += 1
            continue
        for step in ("PREFLIGHT", "STAGED", "RESTORE_POINT", "VERIFYING"):
            job_record_progress(job_id=job.pk, node_id=node_id, step=step, percent=50)
        if job.kind == UpdateJob.Kind.ROLLBACK:
            _finish_rollback(job)
        elif node_id in failures:
            job_finish(
                job_id=job.pk,
                node_id=node_id,
                ok=False,
                error_code="HEALTH_CHECK_FAILED_ROLLED_BACK",
                error_message=failures[node_id],
            )
        else:
            assert job.release is not None
            job_finish(
                job_id=job.pk,
                node_id=node_id,
                ok=True,
                result={
                    "version_from": job.node.installed_version,
                    "version_to": job.release.version,
                    "restore_point": f"rp-{node_id}-{job.pk}",
                },
            )
        if on_done is not None:
            on_done(job)
        answered += 1
    return answered


def finish_queued_updates_in_bulk(*, now: datetime | None = None) -> int:
    """Every QUEUED update job of the primary product done at once, leaving what the
    coordinator reads after `job_finish` and the node's next heartbeat: the job DONE, its
    command acknowledged, the node online on the release's version with a heartbeat just
    after. A few set-wise statements however many jobs (the one-by-one answers manage some
    25 jobs a second): no audit events, no wake-ups (the caller drives). Returns how many."""
    now = now or timezone.now()
    queued = UpdateJob.objects.filter(
        state=UpdateJob.State.QUEUED,
        kind=UpdateJob.Kind.UPDATE,
        release__product=PRIMARY_PRODUCT,
    )
    with transaction.atomic():
        versions = set(queued.values_list("release__version", flat=True).distinct())
        for release_version in versions:
            nodes = queued.filter(release__version=release_version).values("node_id")
            Node.objects.filter(pk__in=Subquery(nodes)).update(
                installed_version=release_version,
                status=Node.Status.ONLINE,
                last_heartbeat=now + timedelta(milliseconds=1),
            )
        NodeCommand.objects.filter(
            job_id__in=Subquery(queued.values("pk")), state__in=NodeCommand.OPEN_STATES
        ).update(state=NodeCommand.State.ACKED, acked_at=now)
        return queued.update(
            state=UpdateJob.State.DONE,
            progress_percent=100,
            finished_at=now,
            last_report_at=now,
        )


def _answer_contract(job: UpdateJob, failure: str | None) -> None:
    """What agent.contract reports: the contract migrations ran (or one failed and was
    undone by the migrator), with the schema version after them."""
    node_id = job.node.node_id
    job_record_progress(job_id=job.pk, node_id=node_id, step="ACCEPTED", percent=1)
    job_record_progress(job_id=job.pk, node_id=node_id, step="CONTRACTING", percent=10)
    if failure is not None:
        job_finish(
            job_id=job.pk,
            node_id=node_id,
            ok=False,
            error_code="MIGRATION_FAILED",
            error_message=failure,
        )
        return
    job_finish(
        job_id=job.pk,
        node_id=node_id,
        ok=True,
        result={"ok": True, "applied": [], "dropped": [], "schema_version": "0002"},
    )


def _finish_rollback(job: UpdateJob) -> None:
    point = next(
        (p for p in job.node.restore_points or [] if p.get("id") == job.restore_point), None
    )
    # a rollout node always belongs to a rollout: a job without one has no row
    row = (
        RolloutNode.objects.filter(rollout_id=job.rollout_id, node_id=job.node_id).first()
        if job.rollout_id is not None
        else None
    )
    if point is not None:
        before = point.get("version") or ""
    else:
        before = row.version_before if row else job.node.installed_version
    job_finish(
        job_id=job.pk,
        node_id=job.node.node_id,
        ok=True,
        result={"version_from": job.node.installed_version, "version_to": before},
    )


def report_metrics(node_ids: list[str], *, error_rate: float, p99_ms: float) -> None:
    """What the nodes' heartbeats would carry from their services."""
    Node.objects.filter(node_id__in=node_ids).update(
        error_rate=error_rate, p99_latency_ms=p99_ms, service_healthy=True
    )


class NullTransport:
    """A NodeTransport that sends nothing: the simulated agents above (or the
    test itself) play the nodes' side."""

    def update_node(self, node_id: str, job_id: str, **options: object) -> None:
        pass

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        pass

    def health_check(self, node_id: str) -> dict[str, object]:
        return {"ok": True}

    def install_trust_store(self, node_id: str, version: int, store: str) -> None:
        pass

    def set_traffic_role(self, node_id: str, role: str) -> None:
        pass

    def cancel_job(self, node_id: str, job_id: str) -> None:
        pass

    def contract_node(self, node_id: str, job_id: str, version: str) -> None:
        pass

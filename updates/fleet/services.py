"""Writes with side effects on the fleet: heartbeats, liveness, the audit log."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from updates.audit import SYSTEM, event_log
from updates.fleet import validation as v
from updates.fleet.liveness import Liveness
from updates.fleet.reports import report_reject
from updates.fleet.validation import CommandRefusal
from updates.jobs.outbox import commands_ack_traffic_role, commands_ack_trust_store
from updates.jobs.services import (
    JobConflict,
    job_end_by_operator,
    job_finish,
    job_heartbeat_refresh,
    job_start_rollback,
    job_start_update,
)
from updates.models import (
    PRIMARY_PRODUCT,
    TAG_PATTERN,
    Node,
    NodeComponent,
    NodeGroup,
    Release,
    ReportRejection,
    Tag,
    UpdateJob,
)
from updates.rollouts.rollback_plan import rollback_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """What an agent reports. Agents are untrusted: every field is sanitised."""

    node_id: str
    installed_version: str = ""
    raft_role: str = ""
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    load_1m: float | None = None
    restore_points: tuple[dict[str, Any], ...] = ()
    # What the restore points hold on disk together (None: not reported).
    restore_points_bytes: int | None = None
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    service_healthy: bool | None = None
    last_job: dict[str, Any] | None = None
    # The job the agent is working on right now: a sign of life for that job.
    active_job_id: int | None = None
    # The traffic role the node serves now ("active"/"standby"; "" outside blue/green).
    traffic_role: str = ""
    # The trust store installed (0: the bootstrap anchor only; -1: one it cannot read).
    trust_store_version: int = 0

    # Commands the agent refused since its last heartbeat (forged, replayed, expired...).
    refusals: tuple[CommandRefusal, ...] = ()
    # The node database's schema (None: not reported; the node keeps what it had).
    schema: v.SchemaReport | None = None
    # The components installed (None: not reported, or refused: the node keeps what it had).
    components: tuple[v.ComponentReport, ...] | None = None
    # Why a malformed `components` was ignored ("" when it was fine or absent).
    components_refused: str = ""
    # The host (OS, kernel, architecture, CPUs, memory); None: not reported, or malformed
    # (then ignored as `components` is: the node keeps what it had).
    inventory: dict[str, str | int] | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Heartbeat:
        """The heartbeat in a verified payload; ReportFieldInvalid if any field is bad."""
        role = v.text(payload.get("raft_role"), "raft_role", max_len=16)
        traffic = v.text(payload.get("traffic_role"), "traffic_role", max_len=8)
        if traffic and traffic not in TRAFFIC_ROLES:
            raise v.ReportFieldInvalid("traffic_role: expected active, standby or nothing")
        last_job = payload.get("last_job")
        if last_job is not None:
            # Checked now, so a heartbeat is taken whole or not at all.
            v.FinalReport.from_payload(v.plain_json(last_job, "last_job"), node_id="")
        active = payload.get("active_job_id")
        # A newer field than the rest: a malformed one is ignored (and counted) rather than
        # costing the node its heartbeat, so a faulty agent still shows as alive.
        components, components_refused = None, ""
        try:
            components = v.components(payload.get("components"))
        except v.ReportFieldInvalid as err:
            components_refused = str(err)
        try:
            inventory = v.inventory(payload.get("inventory"))
        except v.ReportFieldInvalid as err:
            log.info("heartbeat of %s: %s: ignored", payload.get("node_id"), err)
            inventory = None
        return cls(
            node_id=v.text(payload.get("node_id"), "node_id", max_len=64, required=True),
            installed_version=v.text(
                payload.get("installed_version"), "installed_version", max_len=64
            ),
            raft_role=role if role in Node.RaftRole.values else "",
            disk_free_bytes=v.optional_integer(payload.get("disk_free_bytes"), "disk_free_bytes"),
            disk_total_bytes=v.optional_integer(
                payload.get("disk_total_bytes"), "disk_total_bytes"
            ),
            memory_available_bytes=v.optional_integer(
                payload.get("memory_available_bytes"), "memory_available_bytes"
            ),
            load_1m=v.optional_float(payload.get("load_1m"), "load_1m"),
            restore_points=v.restore_points(payload.get("restore_points")),
            restore_points_bytes=v.optional_integer(
                payload.get("restore_points_bytes"), "restore_points_bytes"
            ),
            error_rate=v.optional_float(payload.get("error_rate"), "error_rate"),
            p99_latency_ms=v.optional_float(payload.get("p99_latency_ms"), "p99_latency_ms"),
            service_healthy=v.optional_bool(payload.get("service_healthy"), "service_healthy"),
            last_job=last_job,
            active_job_id=None if active is None else v.job_id(active, "active_job_id"),
            traffic_role=traffic,
            trust_store_version=v.integer(
                payload.get("trust_store_version", 0), "trust_store_version", low=-1
            ),
            refusals=v.refusals(payload.get("commands_refused")),
            schema=v.schema_report(payload.get("schema")),
            components=components,
            components_refused=components_refused,
            inventory=inventory,
        )

    def component_versions(self) -> dict[str, str]:
        """product -> version of the components reported (the primary one included)."""
        versions = {c.product: c.version for c in self.components or ()}
        if self.installed_version and PRIMARY_PRODUCT not in versions:
            # The primary component is always there; an agent may report it only the old way.
            versions[PRIMARY_PRODUCT] = self.installed_version
        return versions


TRAFFIC_ROLES = frozenset({"active", "standby"})


@transaction.atomic
def node_record_heartbeat(*, heartbeat: Heartbeat, now: datetime | None = None) -> Node | None:
    """Record a heartbeat. An unknown node id is rejected and logged; no node is created."""
    now = now or timezone.now()
    node = Node.objects.select_for_update().filter(node_id=heartbeat.node_id).first()
    if node is None:
        # Reports are verified against the node's key first: only a node deleted since.
        log.warning("heartbeat from unknown node %r dropped", heartbeat.node_id)
        return None
    came_online = node.status in {Node.Status.OFFLINE, Node.Status.UNKNOWN}
    node.installed_version = heartbeat.installed_version
    node.raft_role = heartbeat.raft_role
    node.disk_free_bytes = heartbeat.disk_free_bytes
    node.disk_total_bytes = heartbeat.disk_total_bytes
    node.memory_available_bytes = heartbeat.memory_available_bytes
    node.load_1m = heartbeat.load_1m
    node.restore_points = list(heartbeat.restore_points)
    node.restore_points_bytes = heartbeat.restore_points_bytes
    node.error_rate = heartbeat.error_rate
    node.p99_latency_ms = heartbeat.p99_latency_ms
    node.service_healthy = heartbeat.service_healthy
    node.last_heartbeat = now
    node.traffic_role = heartbeat.traffic_role
    node.trust_store_version = heartbeat.trust_store_version
    if heartbeat.schema is not None:
        node.schema_version = heartbeat.schema.version
        node.schema_history = list(heartbeat.schema.history)
    if heartbeat.inventory is not None:
        node.inventory = heartbeat.inventory
    if came_online:
        node.status = Node.Status.ONLINE
    node.save()
    _record_components(node, heartbeat, now)
    commands_ack_traffic_role(node, heartbeat.traffic_role, now=now)
    commands_ack_trust_store(node, heartbeat.trust_store_version, now=now)
    if heartbeat.active_job_id is not None:
        job_heartbeat_refresh(job_id=heartbeat.active_job_id, node=node, now=now)
    if heartbeat.last_job:
        _catch_up_final_report(node, heartbeat.last_job)
    for refusal in heartbeat.refusals:
        report_reject(
            node=node,
            claimed_id=node.node_id,
            reason=ReportRejection.Reason.COMMAND_REFUSED,
            detail=f"agent refused a {refusal.command or 'command'}: {refusal.reason}",
            task="agent",
            now=now,
        )
    if came_online:
        event_log(
            verb="node.online",
            actor_label=f"node:{node.node_id}",
            tenant=node.tenant_id,
            obj=node,
            details={"version": node.installed_version},
        )
    return node


def _record_components(node: Node, heartbeat: Heartbeat, now: datetime) -> None:
    if heartbeat.components_refused:
        report_reject(
            node=node,
            claimed_id=node.node_id,
            reason=ReportRejection.Reason.INVALID,
            detail=f"heartbeat components ignored: {heartbeat.components_refused}",
            task="heartbeat",
            now=now,
        )
    if heartbeat.components is None:
        return
    NodeComponent.objects.record(
        node_id=node.pk, versions=heartbeat.component_versions(), now=now, replace=True
    )


def jobs_a_final_report_closes() -> models.QuerySet[UpdateJob]:
    """The jobs a final report repeated in a heartbeat may still close: active, and not
    in a waiting state."""
    return UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).exclude(
        state__in=UpdateJob.WAITING_STATES
    )


def _catch_up_final_report(node: Node, payload: dict[str, Any]) -> None:
    """Close a job whose final report was lost (the agent repeats it in every
    heartbeat). Finishing is conditional on the job being active: a no-op otherwise."""
    report = v.FinalReport.from_payload(payload, node_id=node.node_id)
    if not jobs_a_final_report_closes().filter(pk=report.job_id, node=node).exists():
        return
    job_finish(
        job_id=report.job_id,
        node_id=node.node_id,
        ok=report.ok,
        error_code=report.error_code,
        error_message=report.error_message,
        result=report.result,
    )


def _heard_since(
    stored: datetime | None, exact: datetime | None, *, cutoff: datetime, database_lag: timedelta
) -> bool:
    if exact is not None:
        return exact >= cutoff or (stored is not None and stored >= cutoff)
    return stored is not None and stored >= cutoff - database_lag


def nodes_mark_offline(
    *, silence_seconds: int, now: datetime | None = None, liveness: Liveness | None = None
) -> list[str]:
    """Mark nodes silent for longer than `silence_seconds` offline, one Event each.

    Silence is judged on the exact time in Redis (`liveness`) where it has one, else on the
    database's, which may be THEMIS_LIVENESS_WRITE_SECONDS behind: then only a longer
    silence counts. Each node is claimed by a conditional UPDATE, so two beat runs racing
    each other log one Event per node, not two.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=silence_seconds)
    silent = Node.objects.exclude(status=Node.Status.OFFLINE).filter(
        models.Q(last_heartbeat__lt=cutoff)
        | models.Q(last_heartbeat__isnull=True, status=Node.Status.ONLINE)
    )
    rows = list(silent.values_list("pk", "node_id", "tenant_id", "last_heartbeat"))
    exact = (liveness or Liveness()).last_seen([node_id for _, node_id, _, _ in rows])
    lag = timedelta(seconds=settings.THEMIS_LIVENESS_WRITE_SECONDS)
    rows = [
        row
        for row in rows
        if not _heard_since(row[3], exact.get(row[1]), cutoff=cutoff, database_lag=lag)
    ]
    marked: list[str] = []
    for node_pk, node_id, tenant_id, last in rows:
        with transaction.atomic():
            claimed = (
                Node.objects.filter(pk=node_pk, last_heartbeat=last)
                .exclude(status=Node.Status.OFFLINE)
                .update(status=Node.Status.OFFLINE)
            )
            if not claimed:
                continue
            event_log(
                verb="node.offline",
                actor_label=SYSTEM,
                tenant=tenant_id,
                obj=Node(pk=node_pk, node_id=node_id),
                details={
                    "node_id": node_id,
                    "last_heartbeat": last.isoformat() if last else None,
                    "silence_seconds": silence_seconds,
                },
            )
        marked.append(node_id)
    return marked


# --- actions on many nodes ------------------------------------------------------------


class BulkAction(models.TextChoices):
    ROLLBACK = "rollback", "Roll back"
    UPDATE = "update", "Update"
    TAG = "tag", "Tag"
    UNTAG = "untag", "Untag"
    END_JOB = "end_job", "End the job of"

    @property
    def starts_jobs(self) -> bool:
        return self in (BulkAction.ROLLBACK, BulkAction.UPDATE)

    @property
    def tags(self) -> bool:
        return self in (BulkAction.TAG, BulkAction.UNTAG)


# A confirmation lists every node by name: past this, choose a narrower filter.
MAX_BULK_NODES = 200


@dataclass(frozen=True)
class BulkStep:
    """What one node of a bulk action will do, as the confirmation shows it."""

    node: Node
    detail: str  # "1.7.0 → 1.6.0 (point p-2)", or why it is left out
    point_id: str = ""  # a rollback's restore point
    job: UpdateJob | None = None  # the job an end-job ends
    refused: bool = False


@dataclass(frozen=True)
class BulkOutcome:
    node_id: str
    job_id: int | None
    message: str

    @property
    def done(self) -> bool:
        return self.job_id is not None or self.message.startswith("tagged")


def bulk_steps(
    nodes: list[Node], action: BulkAction, release: Release | None, tag: str = ""
) -> list[BulkStep]:
    """Each node's step, worked out from what it last reported; nothing is written."""
    if action == BulkAction.END_JOB:
        return _end_job_steps(nodes)
    if not action.starts_jobs:
        if not tag:
            return [BulkStep(node, "left out: name a tag", refused=True) for node in nodes]
        verb = "adds" if action == BulkAction.TAG else "removes"
        return [BulkStep(node, f"{verb} tag {tag}") for node in nodes]
    steps = []
    for node in nodes:
        installed = node.installed_version or "—"
        if action == BulkAction.ROLLBACK:
            step = rollback_step(node, busy=False)
            if step.restore_point is None:
                steps.append(BulkStep(node, f"left out: {step.note}", refused=True))
            else:
                detail = f"{installed} → {step.target_version} (point {step.restore_point})"
                steps.append(BulkStep(node, detail, point_id=step.restore_point))
        elif release is None:
            steps.append(BulkStep(node, "left out: choose a release", refused=True))
        elif node.installed_version == release.version:
            steps.append(BulkStep(node, f"left out: runs {release.version} already", refused=True))
        else:
            steps.append(BulkStep(node, f"{installed} → {release.version}"))
    return steps


def _end_job_steps(nodes: list[Node]) -> list[BulkStep]:
    active = {
        job.node_id: job
        for job in UpdateJob.objects.filter(node__in=nodes, state__in=UpdateJob.ACTIVE_STATES)
    }
    steps = []
    for node in nodes:
        job = active.get(node.pk)
        if job is None:
            steps.append(BulkStep(node, "left out: no job in progress", refused=True))
        else:
            detail = f"ends job {job.pk} ({job.get_kind_display()}, {job.state}) as lost"
            steps.append(BulkStep(node, detail, job=job))
    return steps


def bulk_end_jobs(
    *, nodes: list[Node], confirmed_jobs: dict[str, int], reason: str, user: Any
) -> list[BulkOutcome]:
    """End each selected node's job LOST, as its own page does (with who and why), but
    only the job the operator confirmed: a node whose job ended or changed since the
    confirmation is left out."""
    outcomes = []
    for step in _end_job_steps(nodes):
        node_id = step.node.node_id
        job = step.job
        if job is None:
            outcomes.append(BulkOutcome(node_id, None, step.detail))
        elif confirmed_jobs.get(node_id) != job.pk:
            message = "left out: its job changed since you confirmed; review again"
            outcomes.append(BulkOutcome(node_id, None, message))
        elif job_end_by_operator(job=job, user=user, reason=reason):
            outcomes.append(BulkOutcome(node_id, job.pk, f"ended job {job.pk} as lost"))
        else:
            outcomes.append(BulkOutcome(node_id, None, f"job {job.pk} had already ended"))
    event_log(
        verb=f"nodes.bulk_{BulkAction.END_JOB.value}",
        actor=user,
        details={
            "action": BulkAction.END_JOB.value,
            "reason": reason,
            "ended": {o.node_id: o.job_id for o in outcomes if o.job_id is not None},
            "left_out": {o.node_id: o.message for o in outcomes if o.job_id is None},
        },
    )
    return outcomes


def bulk_start(
    *,
    nodes: list[Node],
    action: BulkAction,
    release: Release | None,
    confirmed_points: dict[str, str],
    user: Any,
) -> list[BulkOutcome]:
    """Start the action on each node through the same services as one node's page, each in
    its own transaction: one refused node (busy, no plan, points changed since the
    confirmation) leaves the others going. A rollback goes only to the point the operator
    confirmed; if the node's newest earlier point changed meanwhile, it is left out."""
    outcomes = []
    for step in bulk_steps(nodes, action, release):
        node_id = step.node.node_id
        if step.refused:
            outcomes.append(BulkOutcome(node_id, None, step.detail))
            continue
        if action == BulkAction.ROLLBACK and confirmed_points.get(node_id) != step.point_id:
            message = "left out: its restore points changed since you confirmed; review again"
            outcomes.append(BulkOutcome(node_id, None, message))
            continue
        try:
            if action == BulkAction.ROLLBACK:
                job = job_start_rollback(node=step.node, point_id=step.point_id, user=user)
            else:
                assert release is not None  # bulk_steps refused every node otherwise
                job = job_start_update(node=step.node, release=release, user=user)
        except JobConflict as conflict:
            outcomes.append(BulkOutcome(node_id, None, f"refused: {conflict}"))
        else:
            outcomes.append(BulkOutcome(node_id, job.pk, f"queued: {step.detail}"))
    event_log(
        verb=f"nodes.bulk_{action.value}",
        actor=user,
        details={
            "action": action.value,
            "release": release.version if release is not None else None,
            "started": [o.node_id for o in outcomes if o.job_id is not None],
            "left_out": {o.node_id: o.message for o in outcomes if o.job_id is None},
        },
    )
    return outcomes


# --- tags and groups ----------------------------------------------------------------------


class TagError(ValueError):
    """A tag name that is not one; the message says which and why."""


def _tag_names(names: list[str]) -> list[str]:
    cleaned = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if not re.fullmatch(TAG_PATTERN, name):
            raise TagError(f"{raw[:60]!r} is not a tag: 1 to 40 lowercase letters, digits, . _ : -")
        cleaned.append(name)
    return sorted(set(cleaned))


@transaction.atomic
def nodes_tag(*, nodes: list[Node], add: list[str], remove: list[str], user: Any) -> int:
    """Put tags on nodes and take others off (a tag no node carries any more stays, to be
    used again); the number of nodes changed. Audited once per call."""
    added, removed = _tag_names(add), _tag_names(remove)
    if not added and not removed:
        raise TagError("name a tag to add or remove")
    tags = [Tag.objects.get_or_create(name=name)[0] for name in added]
    through = Node.tags.through
    changed: set[int] = set()
    for tag in tags:
        have = set(
            through.objects.filter(tag=tag, node__in=nodes).values_list("node_id", flat=True)
        )
        missing = [node for node in nodes if node.pk not in have]
        through.objects.bulk_create([through(node=node, tag=tag) for node in missing])
        changed.update(node.pk for node in missing)
    if removed:
        gone = through.objects.filter(tag__name__in=removed, node__in=nodes)
        changed.update(gone.values_list("node_id", flat=True))
        gone.delete()
    event_log(
        verb="nodes.tagged",
        actor=user,
        details={
            "nodes": [node.node_id for node in nodes if node.pk in changed][:100],
            "changed": len(changed),
            "added": added,
            "removed": removed,
        },
    )
    return len(changed)


@transaction.atomic
def node_group_save(*, name: str, query: dict[str, str], user: Any) -> NodeGroup:
    """Save (or replace, by name) a fleet filter as a group; audited."""
    name = name.strip()[:120]
    if not name:
        raise TagError("name the group to save it")
    kept = {key: str(value)[:64] for key, value in query.items() if key in GROUP_KEYS and value}
    if not kept:
        raise TagError("a group needs at least one filter: it would be the whole fleet")
    group, created = NodeGroup.objects.update_or_create(
        name=name, defaults={"query": kept, "created_by": user}
    )
    event_log(
        verb="node_group.saved" if created else "node_group.replaced",
        actor=user,
        details={"name": name, "filter": kept},
    )
    return group


# The fleet filter fields a group keeps (not the sort or the page).
GROUP_KEYS = ("q", "tenant", "cluster", "status", "version", "tag")


def bulk_tag(*, nodes: list[Node], action: BulkAction, tag: str, user: Any) -> list[BulkOutcome]:
    """Tag or untag the selected nodes in one transaction; the outcome per node."""
    if action == BulkAction.TAG:
        nodes_tag(nodes=nodes, add=[tag], remove=[], user=user)
        return [BulkOutcome(node.node_id, None, f"tagged {tag}") for node in nodes]
    nodes_tag(nodes=nodes, add=[], remove=[tag], user=user)
    return [BulkOutcome(node.node_id, None, f"tagged: {tag} removed") for node in nodes]

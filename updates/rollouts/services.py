"""Rollouts as people ask for them: preview, create (also per-tenant rollback), and the
operator actions start, approve, pause, resume, cancel, abort and retry.
Calls plan, records, gate (approval asks it again) and updates.jobs (to wake the
coordinator); never the coordinator itself, which does the work on its next drive.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from tenants.models import Tenant
from updates.audit import event_log
from updates.jobs import services as jobs
from updates.jobs.selectors import plan_groups_for_nodes, product_versions
from updates.models import Node, Release, Rollout, RolloutNode, RolloutTemplate
from updates.rollout_options import RolloutOptions
from updates.rollouts.gate import GateVerdict, canary_gate
from updates.rollouts.plan import NodeInfo, Plan, PlanError, plan_rollout
from updates.rollouts.records import Decision, record_decision, rollout_event
from updates.rollouts.rollback_plan import tenant_rollback_plan

log = logging.getLogger(__name__)

R = Rollout.State
RN = RolloutNode.State
CS = RolloutNode.ContractState

# Options as callers give them: a RolloutOptions, or (partial) JSON with defaults filled in.
OptionsInput = RolloutOptions | Mapping[str, Any] | None


class RolloutError(Exception):
    """The request cannot be done in the rollout's current state."""


def _options(options: OptionsInput) -> RolloutOptions:
    if isinstance(options, RolloutOptions):
        return options
    return RolloutOptions.from_json(options)


# ------------------------------------------------------------------ creation


def node_infos(nodes: list[Node], versions: Mapping[int, str] | None = None) -> list[NodeInfo]:
    """The nodes as the planner sees them; `versions` (node pk -> version) when the release
    is of another component than the server, whose version is `installed_version`."""
    return [
        NodeInfo(
            pk=n.pk,
            node_id=n.node_id,
            cluster_id=n.cluster_id,
            is_leader=n.raft_role == Node.RaftRole.LEADER,
            installed_version=n.installed_version if versions is None else versions[n.pk],
            color=n.color,
        )
        for n in nodes
    ]


def rollout_preview(
    *, release: Release, strategy: str, nodes: list[Node], options: OptionsInput = None
) -> Plan:
    """The plan as it would run, without saving anything (shown before start)."""
    idle = _idle_color(nodes) if strategy == Rollout.Strategy.BLUE_GREEN else ""
    return plan_rollout(
        strategy,
        release.version,
        # Skips and the skew guard compare versions of the release's own product.
        node_infos(nodes, product_versions(nodes, release.product)),
        stages=_options(options).stage_fractions,
        idle_color=idle,
    )


def _idle_color(nodes: list[Node]) -> str:
    clusters = {n.cluster for n in nodes if n.cluster is not None}
    if len(clusters) != 1:
        raise PlanError("blue/green targets exactly one cluster")
    active = next(iter(clusters)).active_color
    if active not in {"blue", "green"}:
        raise PlanError("blue/green: the cluster has no active colour (blue or green)")
    return "green" if active == "blue" else "blue"


@transaction.atomic
def rollout_create(
    *,
    release: Release,
    strategy: str,
    nodes: list[Node],
    user: User | None,
    target: dict[str, Any] | None = None,
    options: OptionsInput = None,
    name: str = "",
) -> Rollout:
    if release.state != Release.State.PUBLISHED:
        raise PlanError(f"release {release.version} is {release.state}: no new rollouts")
    opts = _options(options)
    plan = rollout_preview(release=release, strategy=strategy, nodes=nodes, options=opts)
    _refuse_unresolvable(release, nodes, {p.node.pk for p in plan.nodes})
    tenants = {n.tenant_id for n in nodes}
    clusters = {n.cluster_id for n in nodes}
    rollout = Rollout.objects.create(
        release=release,
        strategy=strategy,
        name=name,
        target=target or {},
        tenant_id=next(iter(tenants)) if len(tenants) == 1 else None,
        cluster_id=next(iter(clusters)) if len(clusters) == 1 else None,
        options=opts.to_json(),
        created_by=user,
        # Blue/green: the colour being updated is the one that will serve; recorded
        # now, so no later switch has to work it out from the cluster's current colour.
        target_color=_idle_color(nodes) if strategy == Rollout.Strategy.BLUE_GREEN else "",
    )
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node_id=p.node.pk,
            position=p.position,
            stage=p.stage,
            is_leader=p.node.is_leader,
            version_before=p.node.installed_version,
        )
        for p in plan.nodes
    )
    rollout_event(
        rollout,
        "rollout.created",
        actor=user,
        nodes_total=len(plan.nodes),
        stages=plan.stage_sizes,
    )
    return rollout


def _refuse_unresolvable(release: Release, nodes: list[Node], planned: set[int]) -> None:
    """Every planned node must have an update plan to the release (its components and
    the published releases allow one); otherwise nothing is created and the message
    names the nodes (a few per reason) and why."""
    groups = plan_groups_for_nodes(release, [n for n in nodes if n.pk in planned])
    failed = [g for g in groups if g.failed]
    if not failed:
        return
    reasons = []
    for group in failed:
        named = ", ".join(group.node_ids[:5])
        more = f" and {len(group.node_ids) - 5} more" if len(group.node_ids) > 5 else ""
        reasons.append(f"{named}{more}: {group.explanation}")
    raise PlanError(
        f"no update plan to {release.product} {release.version} for " + "; ".join(reasons)
    )


@transaction.atomic
def tenant_rollback_start(*, tenant: Tenant, user: User | None) -> Rollout:
    """Roll every node of a tenant back to its previous release: a rolling
    rollout of rollback jobs (one node per cluster at a time, leaders last)."""
    steps = [s for s in tenant_rollback_plan(tenant) if s.restore_point]
    if not steps:
        raise PlanError(f"no node of {tenant.name} has an earlier release to go back to")
    versions = Counter(s.installed_version for s in steps)
    current = Release.objects.filter(version=versions.most_common(1)[0][0]).first()
    if current is None:
        raise PlanError("the installed version is not a published release here")
    rollout = Rollout.objects.create(
        release=current,
        strategy=Rollout.Strategy.ROLLBACK,
        tenant=tenant,
        name=f"roll back {tenant.name}",
        target={"tenant": tenant.name},
        options=RolloutOptions(max_unavailable=1).to_json(),
        created_by=user,
    )
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node=s.node,
            position=i,
            stage=0,
            is_leader=s.node.raft_role == Node.RaftRole.LEADER,
            version_before=s.installed_version,
        )
        for i, s in enumerate(steps)
    )
    rollout_event(rollout, "rollout.created", actor=user, nodes_total=len(steps), rollback=True)
    return rollout_start(rollout=rollout, user=user)


# --------------------------------------------------------------- operator actions


def _transition(rollout: Rollout, allowed: tuple[str, ...], to: str, **fields: Any) -> None:
    moved = Rollout.objects.transition(rollout.pk, allowed, to, **fields)
    rollout.refresh_from_db()
    if not moved:
        raise RolloutError(f"rollout {rollout.pk} is {rollout.state}: cannot go to {to}")


def _operator_action(
    rollout: Rollout,
    user: User | None,
    allowed: tuple[str, ...],
    to: str,
    decision: Decision,
    *,
    drive: bool = True,
    error_message: str | None = None,
    **details: Any,
) -> Rollout:
    """A person's decision: conditional transition, StageDecision, Event, wake-up."""
    fields = {"error_message": error_message} if error_message is not None else {}
    _transition(rollout, allowed, to, **fields)
    record_decision(rollout, decision, user, **details)
    rollout_event(rollout, f"rollout.{decision.value}", actor=user, **details)
    if drive:
        jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return rollout


@transaction.atomic
def rollout_start(*, rollout: Rollout, user: User | None) -> Rollout:
    _transition(rollout, (R.PLANNED,), R.RUNNING, started_at=timezone.now())
    record_decision(rollout, Decision.STARTED, user)
    rollout_event(rollout, "rollout.started", actor=user, nodes_total=rollout.plan.count())
    jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return rollout


@transaction.atomic
def rollout_schedule(*, rollout: Rollout, user: User | None, start_at: datetime) -> Rollout:
    """Leave a planned rollout planned until `start_at`; the coordinator's beat starts it."""
    if not Rollout.objects.filter(pk=rollout.pk, state=R.PLANNED).update(start_at=start_at):
        rollout.refresh_from_db()
        raise RolloutError(f"rollout {rollout.pk} is {rollout.state}: cannot be scheduled")
    rollout.refresh_from_db()
    rollout_event(rollout, "rollout.scheduled", actor=user, start_at=start_at.isoformat())
    return rollout


def rollouts_start_due(*, now: datetime | None = None) -> list[int]:
    """Start every planned rollout whose start time has come; the ids started. Safe to run
    from several beats at once: the conditional start lets one of them win each."""
    due = Rollout.objects.filter(state=R.PLANNED, start_at__lte=now or timezone.now())
    started = []
    for rollout in due.order_by("start_at", "pk"):
        try:
            rollout_start(rollout=rollout, user=None)
        except RolloutError as lost:
            log.info("scheduled start: %s", lost)  # another beat started or cancelled it
            continue
        started.append(rollout.pk)
    return started


def rollout_approve(*, rollout: Rollout, user: User) -> Rollout:
    """Promote a canary to its next stage: a responder's or operator's call. The
    health gate is asked again, on the metrics as they are now: an approval given
    after the canary breached is refused with the reason (and recorded), as is one by
    the rollout's starter when it asks for four eyes."""
    with transaction.atomic():
        rollout.refresh_from_db()
        refusal = _approval_refusal(rollout, user)
        if refusal is None:
            _transition(rollout, (R.AWAITING_APPROVAL,), R.RUNNING)
            record_decision(rollout, Decision.APPROVED, user, to_stage=rollout.current_stage + 1)
            Rollout.objects.filter(pk=rollout.pk).update(current_stage=rollout.current_stage + 1)
            rollout.refresh_from_db()
            rollout_event(rollout, "rollout.promoted", actor=user, approved_by=user.get_username())
            jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
            return rollout
        record_decision(rollout, Decision.APPROVAL_REFUSED, user, **refusal.details)
        rollout_event(rollout, "rollout.approval_refused", actor=user, reason=refusal.reason)
    raise RolloutError(f"approval refused: {refusal.message}")


@dataclass(frozen=True)
class _ApprovalRefusal:
    message: str  # for the person who asked
    reason: str  # for the event
    details: dict[str, Any]  # for the decision record


def _approval_refusal(rollout: Rollout, user: User) -> _ApprovalRefusal | None:
    if needs_other_approver(rollout, user):
        reason = "four eyes: who started this rollout may not approve it"
        message = (
            "this rollout needs four eyes and you started it: another responder or operator"
            " must approve"
        )
        return _ApprovalRefusal(message, reason, {"reason": reason})
    verdict = _approval_verdict(rollout)
    if verdict is None or verdict.passed:
        return None
    message = f"the health gate fails now: {verdict.reason}"
    return _ApprovalRefusal(message, verdict.reason, verdict.as_dict())


def needs_other_approver(rollout: Rollout, user: Any) -> bool:
    """The four-eyes rule: set on the rollout, and this user started it."""
    return bool(
        rollout.opts.four_eyes
        and rollout.created_by_id is not None
        and rollout.created_by_id == getattr(user, "pk", None)
    )


def _approval_verdict(rollout: Rollout) -> GateVerdict | None:
    """The gate on the canary's updated nodes now; None when there is nothing to
    ask (not a canary awaiting approval: the transition refuses those)."""
    if rollout.strategy != Rollout.Strategy.CANARY or rollout.state != R.AWAITING_APPROVAL:
        return None
    rows = list(
        RolloutNode.objects.filter(
            rollout=rollout, stage__lte=rollout.current_stage, state=RN.DONE
        ).select_related("job")
    )
    return canary_gate(rollout, rows, timezone.now())


@transaction.atomic
def rollout_pause(*, rollout: Rollout, user: User | None) -> Rollout:
    return _operator_action(
        rollout, user, (R.RUNNING, R.AWAITING_APPROVAL), R.PAUSED, Decision.PAUSED, drive=False
    )


@transaction.atomic
def rollout_resume(*, rollout: Rollout, user: User | None) -> Rollout:
    return _operator_action(rollout, user, (R.PAUSED,), R.RUNNING, Decision.RESUMED)


@transaction.atomic
def rollout_cancel(*, rollout: Rollout, user: User | None) -> Rollout:
    """Stop starting nodes; those in flight finish (or roll back) on their own."""
    allowed = (R.PLANNED, R.RUNNING, R.AWAITING_APPROVAL, R.PAUSED)
    return _operator_action(rollout, user, allowed, R.CANCELLING, Decision.CANCELLED)


@transaction.atomic
def rollout_abort(
    *, rollout: Rollout, user: User | None, reason: str = "aborted by operator"
) -> Rollout:
    """Stop, and roll back every node the rollout touched."""
    allowed = (R.PLANNED, R.RUNNING, R.AWAITING_APPROVAL, R.PAUSED, R.CANCELLING)
    return _operator_action(
        rollout, user, allowed, R.ABORTING, Decision.ABORTED, error_message=reason, reason=reason
    )


@transaction.atomic
def rollout_retry_failed(*, rollout: Rollout, user: User | None) -> int:
    """Give the failed nodes of a finished rollout another go: their update, or their
    contract step (every contract not done is decided again, once the updates are)."""
    failed = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.FAILED, RN.ROLLED_BACK])
    contract_failed = RolloutNode.objects.filter(rollout=rollout, contract_state=CS.FAILED)
    count = failed.count() + contract_failed.count()
    if not count:
        raise RolloutError("no failed nodes to retry")
    _transition(
        rollout, (R.FAILED, R.COMPLETED, R.CANCELLED), R.RUNNING, finished_at=None, error_message=""
    )
    stages = list(failed.values_list("stage", flat=True))
    for row in failed:
        RolloutNode.objects.filter(pk=row.pk).update(
            state=RN.PENDING, job=None, attempts=row.attempts + 1
        )
    RolloutNode.objects.filter(rollout=rollout, state=RN.SKIPPED, job__isnull=True).update(
        state=RN.PENDING
    )
    RolloutNode.objects.filter(rollout=rollout).exclude(
        contract_state__in=[CS.NONE, CS.DONE]
    ).update(contract_state=CS.NONE, contract_job=None, contract_due_at=None, contract_note="")
    last_stage = RolloutNode.objects.filter(rollout=rollout).aggregate(last=Max("stage"))["last"]
    Rollout.objects.filter(pk=rollout.pk).update(current_stage=min(stages, default=last_stage or 0))
    record_decision(rollout, Decision.RETRY, user, nodes=count)
    rollout_event(rollout, "rollout.retried", actor=user, nodes=count)
    jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return count


@transaction.atomic
def rollout_template_save(
    *, name: str, strategy: str, options: RolloutOptions, user: User | None
) -> RolloutTemplate:
    """Save (or replace, by name) a rollout template; audited."""
    name = name.strip()[:120]
    if not name:
        raise RolloutError("name the template to save it")
    template, created = RolloutTemplate.objects.update_or_create(
        name=name,
        defaults={"strategy": strategy, "options": options.to_json(), "created_by": user},
    )
    event_log(
        verb="rollout_template.saved" if created else "rollout_template.replaced",
        actor=user,
        obj=template,
        details={"name": name, "strategy": strategy},
    )
    return template

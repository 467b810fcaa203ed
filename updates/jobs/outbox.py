"""The outbox: every command to a node's agent is a NodeCommand row, written in the
transaction that causes it, and sent only by the relay here.

The relay claims a due row with a conditional UPDATE on its attempt count, so two relays
never send the same attempt; it builds the task's arguments at send time (a fresh download
token each time) and re-sends every `ack_timeout` seconds until the agent acknowledges the
command (any report for its job, or a heartbeat showing the traffic role) or `max_sends`
sends went unanswered; then the command is abandoned and its job ends LOST. A broker error
costs no attempt: the row stays open and is retried soon.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Protocol, runtime_checkable

from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from updates.audit import SYSTEM, event_log
from updates.engine.commands import TASK_FOR, CommandType, sign_command
from updates.jobs.deadlines import JobDeadlines, deadlines_for, job_end_lost
from updates.jobs.transport import NodeTransport, default_transport
from updates.models import (
    PRIMARY_PRODUCT,
    Node,
    NodeCommand,
    Release,
    ReleaseFile,
    TrustStoreVersion,
    UpdateJob,
)
from updates.releases.artifacts import (
    artifact_url,
    delta_variant,
    job_download_token,
    plan_artifact_url,
)
from updates.releases.parts import job_parts_url

log = logging.getLogger(__name__)

C = NodeCommand
# After a broker error, try again this soon (the attempt is not counted).
BROKER_RETRY_SECONDS = 5


@runtime_checkable
class TrafficRoles(Protocol):
    """A transport that can tell a node whether it serves traffic."""

    def set_traffic_role(self, node_id: str, role: str) -> None: ...


@runtime_checkable
class TrustStores(Protocol):
    """A transport that can offer a node a signed trust store."""

    def install_trust_store(self, node_id: str, version: int, store: str) -> None: ...


@runtime_checkable
class SignedCommands(Protocol):
    """A transport that carries signed command envelopes (the real one does)."""

    def send_command(self, node_id: str, task: str, envelope: dict[str, Any]) -> None: ...


@runtime_checkable
class JobCancels(Protocol):
    """A transport that can ask a node to cancel a job."""

    def cancel_job(self, node_id: str, job_id: str) -> None: ...


@runtime_checkable
class SchemaContracts(Protocol):
    """A transport that can ask a node to run a release's contract migrations."""

    def contract_node(self, node_id: str, job_id: str, version: str) -> None: ...


# A signed command is valid for this long after its send (at least): twice the time
# the relay waits for its acknowledgement, after which it sends a fresh one.
MIN_COMMAND_LIFETIME_SECONDS = 60


class RelayOutcome(StrEnum):
    SENT = "sent"
    BROKER_ERROR = "broker_error"
    ABANDONED = "abandoned"  # its job ended, it was superseded, or it ran out of sends
    SKIPPED = "skipped"  # not due, already closed, or claimed by another relay


# ------------------------------------------------------------------ writing commands


def command_for_job(job: UpdateJob, *, options: dict[str, Any] | None = None) -> NodeCommand:
    """The APPLY, ROLLBACK or CONTRACT command of a QUEUED job. Call inside the transaction
    that queues the job; then `relay_after_commit` sends it once that commits."""
    args: dict[str, Any]
    if job.kind == UpdateJob.Kind.UPDATE:
        kind, args = C.Kind.APPLY, {"options": dict(options or {})}
    elif job.kind == UpdateJob.Kind.CONTRACT:
        assert job.release is not None, "a contract job names its release"
        kind, args = C.Kind.CONTRACT, {"version": job.release.version}
    else:
        kind, args = C.Kind.ROLLBACK, {"point_id": job.restore_point or None}
    return NodeCommand.objects.create(
        node_id=job.node_id, job=job, kind=kind, args=args, next_attempt_at=timezone.now()
    )


def commands_for_jobs(
    jobs: list[UpdateJob], *, options: dict[str, Any] | None = None
) -> list[NodeCommand]:
    """`command_for_job` for many QUEUED update jobs, with one INSERT."""
    assert all(job.kind == UpdateJob.Kind.UPDATE for job in jobs), "update jobs only"
    now = timezone.now()
    return NodeCommand.objects.bulk_create(
        NodeCommand(
            node_id=job.node_id,
            job=job,
            kind=C.Kind.APPLY,
            args={"options": dict(options or {})},
            next_attempt_at=now,
        )
        for job in jobs
    )


def command_cancel(job: UpdateJob) -> NodeCommand:
    """Ask the agent to cancel a job whose command it may already hold. Call inside
    the transaction that marks the job CANCELLING."""
    return NodeCommand.objects.create(
        node_id=job.node_id, job=job, kind=C.Kind.CANCEL, next_attempt_at=timezone.now()
    )


def command_traffic_role(node: Node, role: str) -> NodeCommand:
    """Tell a node whether it takes traffic. An older role command still open for the
    node is abandoned: re-sending it later would undo this one."""
    C.objects.filter(node=node, kind=C.Kind.TRAFFIC_ROLE, state__in=C.OPEN_STATES).update(
        state=C.State.ABANDONED, last_error="superseded by a newer traffic role"
    )
    return NodeCommand.objects.create(
        node=node, kind=C.Kind.TRAFFIC_ROLE, args={"role": role}, next_attempt_at=timezone.now()
    )


def commands_trust_store(store: TrustStoreVersion, nodes: QuerySet[Node]) -> int:
    """Offer `store` to `nodes` (those not on it or newer yet): one command each, sent by
    the relay and re-sent until a heartbeat shows the version. Older offers still open are
    abandoned: a node takes only the newest anyway."""
    C.objects.filter(node__in=nodes, kind=C.Kind.TRUST_STORE, state__in=C.OPEN_STATES).update(
        state=C.State.ABANDONED, last_error=f"superseded by trust store version {store.version}"
    )
    now = timezone.now()
    made = C.objects.bulk_create(
        C(node_id=pk, kind=C.Kind.TRUST_STORE, args={"store_version": store.version},
          next_attempt_at=now)
        for pk in nodes.filter(trust_store_version__lt=store.version).values_list("pk", flat=True)
    )  # fmt: skip
    return len(made)


def relay_after_commit(command: NodeCommand, transport: NodeTransport | None = None) -> None:
    """The first send, right after the command's transaction commits (the beat relay
    re-sends it if this one fails or the process dies first). Inside `relays_in_bulk`,
    it goes out with the block's other commands."""
    batch = _bulk.get()
    if batch is not None:
        batch.setdefault(transport, []).append(command.pk)
        return
    transaction.on_commit(partial(_relay_quietly, [command.pk], transport))


@contextmanager
def relays_in_bulk() -> Iterator[None]:
    """Inside a transaction: the first sends of the commands written in the block go out
    together once it commits (one read, one claim and one delta lookup for all of them,
    not each its own). A command undone by a savepoint is simply not found then."""
    batch: dict[NodeTransport | None, list[int]] = {}
    token = _bulk.set(batch)
    try:
        yield
    finally:
        _bulk.reset(token)
    for transport, command_ids in batch.items():
        transaction.on_commit(partial(_relay_quietly, command_ids, transport))


# The open `relays_in_bulk` block's commands, by transport (None: the default one).
_bulk: ContextVar[dict[NodeTransport | None, list[int]] | None] = ContextVar(
    "relays_in_bulk", default=None
)


def _relay_quietly(command_ids: list[int], transport: NodeTransport | None) -> None:
    try:
        relay_commands(command_ids, transport=transport)
    except Exception:
        # Never into the request or drive that committed: the beat relay retries.
        log.exception("relaying commands %s failed", command_ids[:20])


# ------------------------------------------------------------------ acknowledgements


def commands_ack_for_job(job_id: int, *, now: datetime) -> int:
    """The agent reported on this job: its open commands are acknowledged."""
    return C.objects.filter(job_id=job_id, state__in=C.OPEN_STATES).update(
        state=C.State.ACKED, acked_at=now
    )


def commands_ack_traffic_role(node: Node, role: str, *, now: datetime) -> int:
    """A heartbeat shows the node serving as `role`: role commands asking that are done."""
    if not role:
        return 0
    return C.objects.filter(
        node=node, kind=C.Kind.TRAFFIC_ROLE, state__in=C.OPEN_STATES, args__role=role
    ).update(state=C.State.ACKED, acked_at=now)


def commands_ack_trust_store(node: Node, version: int, *, now: datetime) -> int:
    """A heartbeat shows trust store `version` installed: offers of it or older are done."""
    if version < 1:
        return 0
    return C.objects.filter(
        node=node,
        kind=C.Kind.TRUST_STORE,
        state__in=C.OPEN_STATES,
        args__store_version__lte=version,
    ).update(state=C.State.ACKED, acked_at=now)


# ------------------------------------------------------------------ the relay


@dataclass(frozen=True)
class RelayResult:
    sent: int = 0
    broker_errors: int = 0
    abandoned: int = 0


def relay_due(
    *, transport: NodeTransport | None = None, now: datetime | None = None, limit: int = 500
) -> RelayResult:
    """Send every open command that is due (beat). Oldest first."""
    now = now or timezone.now()
    due = list(
        C.objects.filter(state__in=C.OPEN_STATES, next_attempt_at__lte=now)
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    counts = Counter(relay_commands(due, transport=transport, now=now).values())
    return RelayResult(
        sent=counts[RelayOutcome.SENT],
        broker_errors=counts[RelayOutcome.BROKER_ERROR],
        abandoned=counts[RelayOutcome.ABANDONED],
    )


def relay_command(
    command_id: int, *, transport: NodeTransport | None = None, now: datetime | None = None
) -> RelayOutcome:
    """Send one command if it is due: claim the attempt, build its arguments, send."""
    outcomes = relay_commands([command_id], transport=transport, now=now)
    return outcomes.get(command_id, RelayOutcome.SKIPPED)


def relay_commands(
    command_ids: Sequence[int],
    *,
    transport: NodeTransport | None = None,
    now: datetime | None = None,
) -> dict[int, RelayOutcome]:
    """Send those of the commands that are due: read and claimed together (rows locked,
    so two relays never claim the same attempt: the other skips them), then each built
    and sent. A command not found open and due is left out of the answer (SKIPPED)."""
    now = now or timezone.now()
    outcomes: dict[int, RelayOutcome] = {}
    with transaction.atomic():
        due = list(
            C.objects.select_for_update(of=("self",), skip_locked=True)
            .select_related("node", "job__node", "job__release", "job__rollout")
            .filter(pk__in=list(command_ids), state__in=C.OPEN_STATES, next_attempt_at__lte=now)
            .order_by("pk")
        )
        # Each command's deadlines, worked out once (its rollout's options are parsed for them).
        deadlines = {command.pk: deadlines_for(command.job) for command in due}
        claimed = []
        for command in due:
            refused = _refuse(command, deadlines[command.pk])
            if refused is None:
                claimed.append(command)
            else:
                outcomes[command.pk] = refused
        _claim(claimed, deadlines, now)
    transport = transport or default_transport()
    deltas = _Deltas([c.job for c in claimed if c.kind == C.Kind.APPLY and c.job is not None])
    for command in claimed:
        outcomes[command.pk] = _send_claimed(
            command, transport, deltas, now=now, lifetime=_lifetime(deadlines[command.pk])
        )
    return outcomes


def _refuse(command: NodeCommand, deadlines: JobDeadlines) -> RelayOutcome | None:
    """Why the command is not sent any more (its outcome, written), or None to send it."""
    job = command.job
    if job is not None and job.state not in UpdateJob.ACTIVE_STATES:
        return _abandon(command, f"job {job.pk} is {job.state}")
    if command.attempts >= deadlines.max_sends:
        return _out_of_sends(command, deadlines)
    if command.node.agent_key_revoked:
        # Nothing is signed for a node whose key is revoked.
        return _out_of_sends(command, deadlines, reason="the node's key is revoked")
    return None


def _claim(commands: list[NodeCommand], deadlines: dict[int, JobDeadlines], now: datetime) -> None:
    """Count an attempt of each (locked) command: one UPDATE per attempt count and ack
    timeout, conditional all the same (a row that moved makes the whole claim fail)."""
    groups: dict[tuple[int, int], list[NodeCommand]] = {}
    for command in commands:
        key = (command.attempts, deadlines[command.pk].ack_timeout)
        groups.setdefault(key, []).append(command)
    for (attempts, ack_timeout), group in groups.items():
        claimed = C.objects.filter(
            pk__in=[c.pk for c in group], attempts=attempts, state__in=C.OPEN_STATES
        ).update(
            attempts=F("attempts") + 1,
            state=C.State.SENT,
            last_sent_at=now,
            next_attempt_at=now + timedelta(seconds=ack_timeout),
            last_error="",
        )
        if claimed != len(group):
            raise RuntimeError(f"commands {[c.pk for c in group][:20]} moved while locked")
    for command in commands:
        command.attempts += 1


def _send_claimed(
    command: NodeCommand,
    transport: NodeTransport,
    deltas: _Deltas,
    *,
    now: datetime,
    lifetime: float,
) -> RelayOutcome:
    attempt = command.attempts
    try:
        _send(command, transport, expires=now.timestamp() + lifetime, deltas=deltas)
    except Exception as error:  # the broker, or anything the transport raises
        log.warning("command %s to %s not sent: %s", command.pk, command.node.node_id, error)
        # The message did not go out: the attempt is given back, and tried again soon.
        C.objects.filter(pk=command.pk, attempts=attempt, state=C.State.SENT).update(
            attempts=attempt - 1,
            state=C.State.SENT if attempt > 1 else C.State.PENDING,
            next_attempt_at=now + timedelta(seconds=BROKER_RETRY_SECONDS),
            last_error=f"{type(error).__name__}: {error}"[:255],
        )
        return RelayOutcome.BROKER_ERROR
    return RelayOutcome.SENT


def _abandon(command: NodeCommand, reason: str) -> RelayOutcome:
    C.objects.filter(pk=command.pk, state__in=C.OPEN_STATES).update(
        state=C.State.ABANDONED, last_error=reason[:255]
    )
    return RelayOutcome.ABANDONED


def _out_of_sends(
    command: NodeCommand, deadlines: JobDeadlines, *, reason: str = ""
) -> RelayOutcome:
    reason = reason or f"not acknowledged after {command.attempts} sends"
    with transaction.atomic():
        abandoned = C.objects.filter(
            pk=command.pk, attempts=command.attempts, state__in=C.OPEN_STATES
        ).update(state=C.State.ABANDONED, last_error=reason)
        if not abandoned:
            return RelayOutcome.SKIPPED
        if command.job_id is not None:
            job_end_lost(job_id=command.job_id, reason=reason)
        else:
            event_log(
                verb="command.abandoned",
                actor_label=SYSTEM,
                tenant=command.node.tenant_id,
                obj=command.node,
                details={
                    "node_id": command.node.node_id,
                    "kind": command.kind,
                    "args": command.args,
                    "reason": reason,
                    "ack_timeout": deadlines.ack_timeout,
                },
            )
    return RelayOutcome.ABANDONED


def _lifetime(deadlines: JobDeadlines) -> float:
    return max(2 * deadlines.ack_timeout, MIN_COMMAND_LIFETIME_SECONDS)


def _send(
    command: NodeCommand, transport: NodeTransport, *, expires: float, deltas: _Deltas
) -> None:
    """Build the command's arguments now and send them, signed with the node's key
    (a fresh envelope, nonce and expiry at every send)."""
    node_id = command.node.node_id
    job = command.job
    kind, job_id, args = _command_args(command, deltas)
    if isinstance(transport, SignedCommands):
        envelope = sign_command(
            bytes.fromhex(command.node.agent_key),
            node_id=node_id,
            job_id=job_id,
            command=kind,
            args=args,
            expires=expires,
        )
        transport.send_command(node_id, TASK_FOR[kind], envelope)
        return
    # Unit tests' recording transports: the same arguments, through the seam's methods.
    if kind is CommandType.TRUST_STORE:
        if not isinstance(transport, TrustStores):
            raise TypeError(f"{type(transport).__name__} cannot offer a trust store")
        transport.install_trust_store(node_id, int(args["store_version"]), str(args["store"]))
    elif kind is CommandType.TRAFFIC_ROLE:
        if not isinstance(transport, TrafficRoles):
            raise TypeError(f"{type(transport).__name__} cannot set a node's traffic role")
        transport.set_traffic_role(node_id, str(args["role"]))
    elif kind is CommandType.CANCEL:
        if not isinstance(transport, JobCancels):
            raise TypeError(f"{type(transport).__name__} cannot cancel a node's job")
        assert job is not None
        transport.cancel_job(node_id, str(job.pk))
    elif kind is CommandType.CONTRACT:
        if not isinstance(transport, SchemaContracts):
            raise TypeError(f"{type(transport).__name__} cannot ask a node for a contract")
        assert job is not None
        transport.contract_node(node_id, str(job.pk), str(args["version"]))
    elif kind is CommandType.ROLLBACK:
        assert job is not None
        transport.rollback_node(node_id, str(job.pk), args["point_id"])
    else:
        assert job is not None
        transport.update_node(node_id, str(job.pk), **args)


def _command_args(
    command: NodeCommand, deltas: _Deltas
) -> tuple[CommandType, str | None, dict[str, Any]]:
    if command.kind == C.Kind.TRAFFIC_ROLE:
        return CommandType.TRAFFIC_ROLE, None, {"role": str(command.args.get("role") or "")}
    if command.kind == C.Kind.TRUST_STORE:
        version = int(command.args.get("store_version") or 0)
        # Read at each send: the store itself is not copied into every node's command.
        envelope = TrustStoreVersion.objects.values_list("envelope", flat=True).get(version=version)
        return CommandType.TRUST_STORE, None, {"store_version": version, "store": envelope}
    job = command.job
    assert job is not None, "apply, rollback, contract and cancel commands belong to a job"
    if command.kind == C.Kind.CANCEL:
        return CommandType.CANCEL, str(job.pk), {}
    if command.kind == C.Kind.CONTRACT:
        return CommandType.CONTRACT, str(job.pk), {"version": str(command.args.get("version"))}
    if command.kind == C.Kind.ROLLBACK:
        point = command.args.get("point_id")
        return CommandType.ROLLBACK, str(job.pk), {"point_id": str(point) if point else None}
    return CommandType.APPLY, str(job.pk), apply_kwargs(job, command.args, deltas=deltas)


def apply_kwargs(
    job: UpdateJob, args: dict[str, Any], *, deltas: _Deltas | None = None
) -> dict[str, Any]:
    """The `agent.apply` arguments, made at each send: a token made now is valid for
    THEMIS_DOWNLOAD_TOKEN_SECONDS from this send, not from the job's first one.
    `deltas`: the delta bundles of the jobs sent together, when already read."""
    release = job.release
    assert release is not None
    extra = dict(args.get("options") or {})
    if job.rollout is not None and "health_timeout" not in extra:
        extra["health_timeout"] = job.rollout.opts.health_timeout
    full: dict[str, Any] = {
        "artifact_url": artifact_url(job),
        "sha256": release.sha256,
        "size": release.size,
    }
    delta = (deltas or _Deltas([job])).of(job)
    if delta is not None:
        # The agent falls back to the full bundle for any file whose base on the node is
        # not the one the delta was made against.
        full = {
            "artifact_url": artifact_url(job, variant=delta_variant(delta.base_version)),
            "sha256": delta.sha256,
            "size": delta.size,
            "full_artifact_url": full["artifact_url"],
            "full_sha256": full["sha256"],
            "full_size": full["size"],
        }
    elif (parts := job_parts_url(job)) is not None:
        # Only the files the node lacks; the agent falls back to `artifact_url`.
        full["parts_url"] = parts
    kwargs = {
        "download_token": job_download_token(job),
        "version": release.version,
        **full,
        **extra,
    }
    steps = _plan_kwargs(job)
    if len(steps) > 1 or (steps and release.product != PRIMARY_PRODUCT):
        # The top-level keys stay the target's bundle: an agent without plan support
        # installs the target alone, as before. A lone step of another component goes as
        # a plan too: only a plan tells the agent which component's dirs it goes into.
        kwargs["plan"] = steps
    return kwargs


class PlanReleaseMissing(LookupError):
    """A release the job's plan names is gone (deleting one is refused while a plan
    names it): the command is not sent rather than sent without a step."""


def _plan_kwargs(job: UpdateJob) -> list[dict[str, Any]]:
    """The job's plan as the agent installs it, in order, each with its bundle."""
    steps = [step for step in job.plan or [] if isinstance(step, dict)]
    wanted = {step.get("release_id") for step in steps}
    if job.release is not None and wanted == {job.release_id}:
        releases = {job.release_id: job.release}  # a plan of one release: read already
    else:
        releases = Release.objects.in_bulk(list(wanted))
    out = []
    for step in steps:
        release = releases.get(step.get("release_id"))
        if release is None:
            raise PlanReleaseMissing(f"job {job.pk}: release {step.get('release_id')} is gone")
        out.append(
            {
                "product": release.product,
                "version": release.version,
                "artifact_url": plan_artifact_url(job, release.pk),
                "sha256": release.sha256,
                "size": release.size,
            }
        )
    return out


class _Deltas:
    """The delta bundles of some jobs' releases made from their nodes' installed versions,
    read in one query (at send time, so a delta finished while a job waited is used)."""

    def __init__(self, jobs: Iterable[UpdateJob]) -> None:
        # The installed version is read with the command (`relay_commands`).
        wanted = {
            (job.release_id, job.node.installed_version)
            for job in jobs
            if job.release_id is not None and job.node.installed_version
        }
        self._found: dict[tuple[int, str], ReleaseFile] = {}
        if not wanted:
            return
        rows = (
            ReleaseFile.objects.filter(
                kind=ReleaseFile.Kind.DELTA,
                release_id__in={release for release, _ in wanted},
                base_version__in={base for _, base in wanted},
            )
            .exclude(file="")
            .order_by("pk")
        )
        for row in rows:  # the newest of each (release, base) wins
            self._found[(row.release_id, row.base_version)] = row

    def of(self, job: UpdateJob) -> ReleaseFile | None:
        installed = job.node.installed_version
        if not installed or job.release_id is None:
            return None
        return self._found.get((job.release_id, installed))

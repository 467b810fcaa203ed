from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from tenants.models import Tenant
from updates.engine.manifest import PRODUCT_SLUG, Dependency
from updates.rollout_options import RolloutOptions

_Owned = TypeVar("_Owned", bound=models.Model)


class TenantScopedQuerySet(models.QuerySet[_Owned]):
    """Querysets of tenant-owned objects: `visible_to(user)` is the one scoping rule."""

    tenant_field = "tenant"

    def visible_to(self, user: Any) -> Self:
        visible = Tenant.objects.visible_to(user)
        return self.filter(**{f"{self.tenant_field}__in": visible})


class NodeQuerySet(TenantScopedQuerySet["Node"]):
    def matching(
        self,
        *,
        search: str = "",
        tenant_id: int | None = None,
        cluster_id: int | None = None,
        status: str = "",
        version: str = "",
        tag: str = "",
    ) -> Self:
        """The nodes a fleet filter matches (the fleet page's, a saved group's)."""
        nodes = self
        if search:
            nodes = nodes.filter(
                models.Q(node_id__istartswith=search) | models.Q(hostname__istartswith=search)
            )
        if tenant_id is not None:
            nodes = nodes.filter(tenant_id=tenant_id)
        if cluster_id is not None:
            nodes = nodes.filter(cluster_id=cluster_id)
        if status:
            nodes = nodes.filter(status=status)
        if version:
            nodes = nodes.filter(installed_version=version)
        if tag:
            nodes = nodes.filter(tags__name=tag)
        return nodes

    def update(self, **kwargs: Any) -> int:
        """A bulk update skips `auto_now`: stamp `updated_at` here, so no writer can change
        a node without the fleet page's live poll seeing it."""
        kwargs.setdefault("updated_at", timezone.now())
        return super().update(**kwargs)


class UpdateJobQuerySet(TenantScopedQuerySet["UpdateJob"]):
    tenant_field = "node__tenant"


class Cluster(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="clusters")
    name = models.CharField(max_length=120)
    # Blue/green: which colour takes traffic ("" when the cluster does not use it)
    active_color = models.CharField(max_length=8, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="cluster_unique_per_tenant")
        ]

    def __str__(self) -> str:
        return self.name


def new_agent_key() -> str:
    """A fresh random key (hex) for one node's agent: signs its reports and our commands."""
    return secrets.token_hex(32)


# A tag: lowercase letters, digits and . _ : - (so it reads the same in a URL and a filter).
TAG_PATTERN = r"^[a-z0-9][a-z0-9._:-]{0,39}$"


class Tag(models.Model):
    """A label an operator puts on nodes (region, hardware, role...) to find and target them."""

    name = models.CharField(
        max_length=40,
        unique=True,
        validators=[
            RegexValidator(
                TAG_PATTERN,
                "A tag is 1 to 40 lowercase letters, digits, '.', '_', ':' or '-', "
                "starting with a letter or digit.",
            )
        ],
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class NodeGroup(models.Model):
    """A saved fleet filter, by name: the nodes it matches now (a dynamic group), to find
    again on the fleet page and to target with a rollout."""

    name = models.CharField(max_length=120, unique=True)
    # The fleet page's filter fields as they were saved: q, tenant (slug), cluster (id),
    # status, version, tag.
    query = models.JSONField(default=dict)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def nodes(self, visible: NodeQuerySet) -> NodeQuerySet:
        """The nodes of `visible` this group matches now. A saved tenant or cluster that no
        longer exists matches nothing rather than everything (fail closed)."""
        query = {key: str(value) for key, value in self.query.items()}
        tenant_id = cluster_id = None
        if query.get("tenant"):
            tenant = Tenant.objects.filter(slug=query["tenant"]).first()
            if tenant is None:
                return visible.none()
            tenant_id = tenant.pk
        if query.get("cluster"):
            if not query["cluster"].isdigit():
                return visible.none()
            cluster_id = int(query["cluster"])
        return visible.matching(
            search=query.get("q", ""),
            tenant_id=tenant_id,
            cluster_id=cluster_id,
            status=query.get("status", ""),
            version=query.get("version", ""),
            tag=query.get("tag", ""),
        )


class Node(models.Model):
    class Status(models.TextChoices):
        UNKNOWN = "unknown"
        ONLINE = "online"
        OFFLINE = "offline"
        UPDATING = "updating"
        FAILED = "failed"

    class RaftRole(models.TextChoices):
        UNKNOWN = ""
        LEADER = "leader"
        FOLLOWER = "follower"
        CANDIDATE = "candidate"
        STANDALONE = "standalone"

    node_id = models.SlugField(max_length=64, unique=True, help_text="agent queue is node.<id>")
    hostname = models.CharField(max_length=255)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="nodes")
    cluster = models.ForeignKey(
        Cluster, on_delete=models.PROTECT, related_name="nodes", null=True, blank=True
    )
    installed_version = models.CharField(max_length=64, blank=True)
    raft_role = models.CharField(max_length=16, choices=RaftRole.choices, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UNKNOWN)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    disk_free_bytes = models.BigIntegerField(null=True, blank=True)
    disk_total_bytes = models.BigIntegerField(null=True, blank=True)
    memory_available_bytes = models.BigIntegerField(null=True, blank=True)
    load_1m = models.FloatField(null=True, blank=True)
    # As the agent reports them: [{"id", "version", "created", "file_count", "size"}]
    tags = models.ManyToManyField(Tag, blank=True, related_name="nodes")
    # The host as its agent reports it: os, kernel, arch, cpus, memory_total_bytes...
    inventory = models.JSONField(default=dict, blank=True)
    restore_points = models.JSONField(default=list, blank=True)
    # What the restore points hold on disk together, as the agent last reported it.
    restore_points_bytes = models.BigIntegerField(null=True, blank=True)
    # Service metrics the agent reads from the managed service
    error_rate = models.FloatField(null=True, blank=True)
    p99_latency_ms = models.FloatField(null=True, blank=True)
    service_healthy = models.BooleanField(null=True, blank=True)
    # Blue/green: the colour this node serves in its cluster
    color = models.CharField(max_length=8, blank=True)
    # What the agent last reported serving as ("active"/"standby"; "" before blue/green).
    traffic_role = models.CharField(max_length=8, blank=True)
    # The trust store the node's agent reports installed (updates.engine.truststore): 0 its
    # bootstrap anchor only, -1 a store it cannot read.
    trust_store_version = models.IntegerField(default=0)
    # Reports: the highest sequence number accepted from this node's agent, and which of the
    # REPORT_WINDOW numbers below it were accepted too (bit i: report_sequence - i). A report
    # overtaken by a later one on another queue still counts; a replay or one older than the
    # window is refused.
    report_sequence = models.PositiveBigIntegerField(default=0)
    report_window = models.BigIntegerField(default=0)
    # The node's own key, shared with its agent only (manage.py node_key): never shown,
    # never logged; pages show its fingerprint. Revoked: no command is signed for the
    # node and its reports are refused until the key is rotated.
    agent_key = models.CharField(max_length=64, default=new_agent_key, editable=False)
    agent_key_revoked = models.BooleanField(default=False)
    agent_key_changed_at = models.DateTimeField(null=True, blank=True)
    # The node database's schema as the agent last reported it ("" before any migration)
    # and its newest history entries: [{"version", "phase", "outcome", "started",
    # "duration_ms"}], newest last.
    schema_version = models.CharField(max_length=64, blank=True)
    schema_history = models.JSONField(default=list, blank=True)
    # When the row last changed (save() and NodeQuerySet.update() both stamp it): the fleet
    # page's live poll sends only the tiles changed since the version it was given.
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    objects = NodeQuerySet.as_manager()

    class Meta:
        ordering = ["node_id"]
        indexes = [
            # The fleet page's version and summary of a tenant's nodes read these indexes
            # alone, never the wide rows (restore points, schema history).
            models.Index(fields=["tenant", "updated_at"], name="node_tenant_updated"),
            models.Index(
                fields=["tenant", "status", "installed_version"], name="node_tenant_status_version"
            ),
        ]

    def __str__(self) -> str:
        return self.node_id

    def restore_point(self, point_id: str) -> dict[str, Any] | None:
        """The restore point of this id as the node last listed it (None: not listed)."""
        return next(
            (
                p
                for p in self.restore_points or []
                if isinstance(p, dict) and p.get("id") == point_id
            ),
            None,
        )

    @property
    def agent_queue(self) -> str:
        return f"node.{self.node_id}"

    def clean(self) -> None:
        cluster = self.cluster if self.cluster_id else None
        if cluster is not None and cluster.tenant_id != self.tenant_id:
            raise ValidationError({"cluster": "A node belongs to its cluster's tenant."})


# The release product of a node's server: a node that reports no components runs this one
# alone, at its `installed_version`.
PRIMARY_PRODUCT = "themisdb"


class NodeComponentQuerySet(models.QuerySet["NodeComponent"]):
    def record(self, *, node_id: int, versions: dict[str, str], now: Any, replace: bool) -> None:
        """Store the node's component versions. `replace`: `versions` is the whole set
        (a heartbeat), so a component no longer listed was removed; otherwise only the
        listed ones changed (a finished job's steps). Rows are written only where the
        version changed (`updated_at` says when), so a steady heartbeat costs one read."""
        stored = dict(self.filter(node_id=node_id).values_list("product", "version"))
        if replace and set(stored) - set(versions):
            self.filter(node_id=node_id).exclude(product__in=list(versions)).delete()
        # A heartbeat and a finished job may add the same row at once: either is right.
        self.bulk_create(
            [
                NodeComponent(node_id=node_id, product=p, version=v[:64], updated_at=now)
                for p, v in versions.items()
                if p not in stored
            ],
            ignore_conflicts=True,
        )
        for product, version in versions.items():
            if product in stored and stored[product] != version[:64]:
                self.filter(node_id=node_id, product=product).update(
                    version=version[:64], updated_at=now
                )


class NodeComponent(models.Model):
    """One component installed on a node (the server, storage, query engine, a plugin), as
    its agent last reported it. The primary component's version is also
    `Node.installed_version`."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="components")
    product = models.CharField(max_length=64)
    version = models.CharField(max_length=64)
    updated_at = models.DateTimeField()

    objects = NodeComponentQuerySet.as_manager()

    class Meta:
        ordering = ["node", "product"]
        constraints = [
            models.UniqueConstraint(fields=["node", "product"], name="node_component_once")
        ]

    def __str__(self) -> str:
        return f"{self.node_id} {self.product} {self.version}"


class ManifestUnreadable(ValueError):
    """A release's stored manifest lists its dependencies in a shape we cannot read."""


class Release(models.Model):
    class State(models.TextChoices):
        PUBLISHED = "published"
        DEPRECATED = "deprecated"

    product = models.CharField(max_length=64, default="themisdb")
    version = models.CharField(max_length=64)
    channel = models.CharField(max_length=32, default="stable")

    class Priority(models.TextChoices):
        CRITICAL = "critical"
        NORMAL = "normal"
        LOW = "low"

    state = models.CharField(max_length=16, choices=State.choices, default=State.PUBLISHED)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.NORMAL)
    manifest = models.JSONField(default=dict)
    signer_subject = models.CharField(max_length=512, blank=True)
    artifact = models.FileField(upload_to="releases/", blank=True)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    published_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["product", "version"], name="release_unique_version")
        ]
        permissions = [("publish_release", "Can publish and deprecate releases")]

    def __str__(self) -> str:
        return f"{self.product} {self.version}"

    @property
    def dependencies(self) -> tuple[Dependency, ...]:
        """What the release needs of other components, as its manifest declares it
        (checked when it was published; read strictly again, as a stored row may come
        from an older dashboard or a hand). ManifestUnreadable when it cannot be read."""
        manifest = self.manifest if isinstance(self.manifest, dict) else {}
        listed = manifest.get("dependencies")
        if listed is None:
            return ()
        if isinstance(listed, dict):
            # The older form {product: specifier}: required dependencies.
            listed = [{"product": name, "constraint": spec} for name, spec in listed.items()]
        if not isinstance(listed, list):
            raise ManifestUnreadable(f"{self}: dependencies is not a list")
        return tuple(self._dependency(entry) for entry in listed)

    def _dependency(self, entry: Any) -> Dependency:
        if not isinstance(entry, dict):
            raise ManifestUnreadable(f"{self}: a dependency is not an object")
        product, constraint = entry.get("product"), entry.get("constraint", "")
        optional, conflicts = entry.get("optional", False), entry.get("conflicts", False)
        if not isinstance(product, str) or not PRODUCT_SLUG.match(product):
            raise ManifestUnreadable(f"{self}: a dependency names no product")
        flags_ok = isinstance(optional, bool) and isinstance(conflicts, bool)
        if not isinstance(constraint, str) or not flags_ok:
            raise ManifestUnreadable(f"{self}: dependency {product} is malformed")
        return Dependency(product, constraint.strip(), optional, conflicts)


@dataclass(frozen=True)
class JobPlanStep:
    """One step of an update job's plan: a component, the version it goes to and the one
    it comes from ("" when the component is new on the node), and the release installed."""

    product: str
    version: str
    from_version: str
    release_id: int

    @property
    def is_new(self) -> bool:
        return not self.from_version

    @property
    def label(self) -> str:
        """`themis-storage 1.3.0 → 1.4.2`, or `themis-query (new) 1.4.5`."""
        if self.is_new:
            return f"{self.product} (new) {self.version}"
        return f"{self.product} {self.from_version} → {self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "version": self.version,
            "from_version": self.from_version,
            "release_id": self.release_id,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> JobPlanStep:
        release_id = item.get("release_id")
        return cls(
            product=str(item.get("product", ""))[:64],
            version=str(item.get("version", ""))[:64],
            from_version=str(item.get("from_version") or "")[:64],
            release_id=release_id if type(release_id) is int else 0,
        )


@dataclass(frozen=True)
class PlanStepOutcome:
    """One step of a multi-component job as the agent's final report tells it."""

    position: int  # 1-based, in plan order
    product: str
    version: str
    state: str

    @classmethod
    def from_report(cls, position: int, item: dict[str, Any]) -> PlanStepOutcome:
        return cls(
            position=position,
            product=str(item.get("product", ""))[:64],
            version=str(item.get("version", ""))[:64],
            state=str(item.get("state", ""))[:32],
        )


@dataclass(frozen=True)
class PlanStepRow:
    """A plan step as a job's page shows it: what it does and how it ended."""

    position: int  # 1-based
    step: JobPlanStep
    state: str  # as the agent's final report says ("" before it, or not reported)
    failed: bool  # the step the agent reported failing


@dataclass(frozen=True)
class VerificationCheck:
    """One post-update check of a job, as shown on the node and rollout pages."""

    name: str
    kind: str
    ok: bool
    detail: str

    @classmethod
    def from_report(cls, item: dict[str, Any]) -> VerificationCheck:
        return cls(
            name=str(item.get("name", ""))[:200],
            kind=str(item.get("kind", ""))[:32],
            ok=item.get("ok") is True,
            detail=str(item.get("detail", ""))[:500],
        )


class UpdateJob(models.Model):
    class Kind(models.TextChoices):
        UPDATE = "update"
        ROLLBACK = "rollback"
        # The installed release's contract migrations, once its whole cluster runs it.
        CONTRACT = "contract"

    class State(models.TextChoices):
        WAITING_FOR_WINDOW = "WAITING_FOR_WINDOW"
        WAITING_FOR_CONSENT = "WAITING_FOR_CONSENT"
        QUEUED = "QUEUED"
        # Cancelled after its command was sent: until the agent answers, it may have
        # started the job (then the job goes on) or not (then it ends CANCELLED).
        CANCELLING = "CANCELLING"
        PREFLIGHT = "PREFLIGHT"
        DOWNLOADING = "DOWNLOADING"
        VERIFYING = "VERIFYING"
        APPLYING = "APPLYING"
        HEALTH_CHECK = "HEALTH_CHECK"
        DONE = "DONE"
        FAILED = "FAILED"
        ROLLED_BACK = "ROLLED_BACK"
        CANCELLED = "CANCELLED"
        # Ended by a deadline or an operator: never acknowledged, silent, or its node gone.
        LOST = "LOST"

    WAITING_STATES = (State.WAITING_FOR_WINDOW, State.WAITING_FOR_CONSENT)
    ACTIVE_STATES = (
        State.WAITING_FOR_WINDOW,
        State.WAITING_FOR_CONSENT,
        State.QUEUED,
        State.CANCELLING,
        State.PREFLIGHT,
        State.DOWNLOADING,
        State.VERIFYING,
        State.APPLYING,
        State.HEALTH_CHECK,
    )
    FINAL_STATES = (State.DONE, State.FAILED, State.ROLLED_BACK, State.CANCELLED, State.LOST)

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.UPDATE)
    release = models.ForeignKey(
        Release, on_delete=models.PROTECT, related_name="jobs", null=True, blank=True
    )
    restore_point = models.CharField(max_length=128, blank=True)
    # The version a rollback's restore point holds, as the node listed it when the job was
    # created (blank when the node did not list the point): what the jobs table shows.
    restore_version = models.CharField(max_length=64, blank=True)
    state = models.CharField(max_length=20, choices=State.choices, default=State.QUEUED)
    progress_percent = models.PositiveSmallIntegerField(default=0)
    step = models.CharField(max_length=64, blank=True)
    bytes_done = models.BigIntegerField(null=True, blank=True)
    bytes_total = models.BigIntegerField(null=True, blank=True)
    # The download's rate (bytes/s) and time left (s) as the node last reported them.
    bytes_per_second = models.BigIntegerField(null=True, blank=True)
    eta_seconds = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    # Why a job waits (window, blackout, consent), shown wherever it waits.
    wait_reason = models.CharField(max_length=255, blank=True)
    rollout = models.ForeignKey(
        "Rollout", on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs"
    )
    # Deadlines: the agent's first report for the job acknowledges it; any report (progress,
    # or a heartbeat naming it as the job in hand) keeps it alive.
    acked_at = models.DateTimeField(null=True, blank=True)
    last_report_at = models.DateTimeField(null=True, blank=True)
    # The sequence number of the progress report the job's figures come from: a report
    # that a later one overtook on the way moves nothing back.
    progress_sequence = models.PositiveBigIntegerField(default=0)
    # The sequence number of the report the byte figures come from: they are ordered on
    # their own, since a download's last report may arrive after a later state's (or after
    # the final report) and still says what the node fetched.
    bytes_sequence = models.PositiveBigIntegerField(default=0)
    # An update's steps in the order the node applies them, resolved from the node's
    # components when the job was made: [{"product", "version", "from_version",
    # "release_id"}]; the job's own release is one of them (empty for older jobs and for
    # rollbacks and contracts).
    plan = models.JSONField(default=list, blank=True)

    objects = UpdateJobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("start_update", "Can start updates and rollbacks")]
        constraints = [
            # One update per node at a time, held by the database too.
            models.UniqueConstraint(
                fields=["node"],
                condition=models.Q(
                    state__in=[
                        "WAITING_FOR_WINDOW",
                        "WAITING_FOR_CONSENT",
                        "QUEUED",
                        "CANCELLING",
                        "PREFLIGHT",
                        "DOWNLOADING",
                        "VERIFYING",
                        "APPLYING",
                        "HEALTH_CHECK",
                    ]
                ),
                name="one_active_job_per_node",
            )
        ]

    def __str__(self) -> str:
        if self.kind == self.Kind.CONTRACT:
            return f"contract job {self.pk}: {self.node} -> {self.release} schema"
        target = self.release or f"restore point {self.restore_point or 'latest'}"
        return f"{self.kind} job {self.pk}: {self.node} -> {target}"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def plan_steps(self) -> tuple[JobPlanStep, ...]:
        """The stored plan, read; entries of another shape are left out."""
        listed = self.plan if isinstance(self.plan, list) else []
        return tuple(JobPlanStep.from_json(item) for item in listed if isinstance(item, dict))

    @property
    def plan_rows(self) -> list[PlanStepRow]:
        """Each step with its outcome from the final report, matched by position and
        product (a report that lists other steps shows none)."""
        outcomes = {o.position: o for o in self.plan_outcomes}
        failed = self.failed_step
        rows = []
        for position, step in enumerate(self.plan_steps, start=1):
            outcome = outcomes.get(position)
            state = outcome.state if outcome and outcome.product == step.product else ""
            rows.append(PlanStepRow(position, step, state, failed == position))
        return rows

    @property
    def plan_release_ids(self) -> set[int]:
        """The releases this job installs: its plan's, or its own release alone."""
        ids = {
            step["release_id"]
            for step in self.plan or []
            if isinstance(step, dict) and type(step.get("release_id")) is int
        }
        if self.release_id is not None:
            ids.add(self.release_id)
        return ids

    @property
    def plan_outcomes(self) -> list[PlanStepOutcome]:
        """Each step's outcome from the agent's final report (multi-step jobs only)."""
        listed = (self.result or {}).get("plan")
        if not isinstance(listed, list):
            return []
        return [
            PlanStepOutcome.from_report(index, item)
            for index, item in enumerate(listed, start=1)
            if isinstance(item, dict)
        ]

    @property
    def failed_step(self) -> int | None:
        """The 1-based plan step the agent reported failing, if any."""
        failed = (self.result or {}).get("failed_step")
        return failed if type(failed) is int and failed > 0 else None

    @property
    def verification_checks(self) -> list[VerificationCheck]:
        """The bundle's post-update checks as the agent reported them (done or rolled back)."""
        listed = (self.result or {}).get("verification")
        if not isinstance(listed, list):
            return []
        return [VerificationCheck.from_report(item) for item in listed if isinstance(item, dict)]


class AppendOnlyError(Exception):
    """Raised on any attempt to change or delete an audit Event."""


class ReportRejection(models.Model):
    """How many agent reports were refused, per claimed source and reason. A counter,
    not a log: a flood of forged reports bumps a number and writes at most one audit
    Event per source per interval (`logged_at` on the reason ALL row is that claim)."""

    class Reason(models.TextChoices):
        ALL = "all"  # the source's total; its logged_at rate-limits the audit Event
        MALFORMED = "malformed"
        UNSIGNED = "unsigned"
        UNKNOWN_NODE = "unknown_node"
        KEY_REVOKED = "key_revoked"
        BAD_SIGNATURE = "bad_signature"
        WRONG_TYPE = "wrong_type"
        STALE = "stale"
        REPLAYED = "replayed"
        INVALID = "invalid"
        COMMAND_REFUSED = "command_refused"  # the agent refused a command sent to it

    # A known node's node_id, or UNKNOWN_SOURCE for every id no node has.
    UNKNOWN_SOURCE = "(unknown node)"

    source = models.CharField(max_length=64)
    reason = models.CharField(max_length=20, choices=Reason.choices)
    count = models.PositiveBigIntegerField(default=0)
    last_at = models.DateTimeField()
    last_detail = models.CharField(max_length=200, blank=True)
    logged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "reason"], name="report_rejection_unique")
        ]

    def __str__(self) -> str:
        return f"{self.source} {self.reason}: {self.count}"


class EventQuerySet(models.QuerySet["Event"]):
    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyError("events are append-only: no update")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("events are append-only: no delete")

    def delete_archived(self, ids: list[int]) -> int:
        """Remove these rows, which retention has written to an archive file first: the one
        way an Event leaves the table (nothing points at an Event, so no cascade is needed)."""
        return self.filter(pk__in=ids)._raw_delete(self.db)

    def visible_to(self, user: Any) -> EventQuerySet:
        if not user.is_authenticated:
            return self.none()
        if user.has_perm("tenants.view_all_tenants"):
            return self.all()
        return self.filter(tenant_id__in=Tenant.objects.visible_to(user).values("id"))


class Event(models.Model):
    """Append-only audit log. References are loose (no FK constraint, no cascade)
    so deleting a user or tenant never rewrites history."""

    created_at = models.DateTimeField(auto_now_add=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
    )
    actor_label = models.CharField(max_length=150, help_text="username, 'system' or node:<id>")
    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
    )
    object_type = models.CharField(max_length=40, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    verb = models.CharField(max_length=64)
    details = models.JSONField(default=dict, blank=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        # The events page reads newest first, (created_at, id) being its cursor: each filter
        # it offers has an index whose tail is that order, so a page is an index range read
        # of one page's rows whatever the table's size (no sort, no count).
        indexes = [
            models.Index(fields=["created_at", "id"], name="event_created"),
            models.Index(fields=["tenant", "created_at", "id"], name="event_tenant_created"),
            models.Index(
                fields=["object_type", "object_id", "created_at", "id"], name="event_object_created"
            ),
            models.Index(fields=["verb", "created_at", "id"], name="event_verb_created"),
            models.Index(fields=["actor_label", "created_at", "id"], name="event_actor_created"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.verb}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("events are append-only: no update")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("events are append-only: no delete")


class ReleaseFile(models.Model):
    """An extra stored file of a release (delta bundles per base version...)."""

    class Kind(models.TextChoices):
        DELTA = "delta"
        OTHER = "other"

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="files")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.DELTA)
    base_version = models.CharField(max_length=64, blank=True)
    file = models.FileField(upload_to="releases/")
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.file.name}"


class ArtifactTombstone(models.Model):
    """A storage path whose database row is gone but whose file may remain:
    written in the same transaction as the delete, removed once the file is."""

    path = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.path


class RolloutQuerySet(TenantScopedQuerySet["Rollout"]):
    def visible_to(self, user: Any) -> Self:
        """Operators and responders see every rollout; a tenant admin those that
        touch one of their tenants' nodes (`Rollout.tenant` is empty when a
        rollout spans tenants, so the plan decides)."""
        if not user.is_authenticated:
            return self.none()
        if user.has_perm("tenants.view_all_tenants"):
            return self
        visible = Tenant.objects.visible_to(user)
        return self.filter(plan__node__tenant__in=visible).distinct()

    def transition(self, pk: int, allowed: Iterable[str], to: str, **fields: Any) -> bool:
        """Move rollout `pk` to state `to` only if it is in one of `allowed`, in one
        conditional UPDATE, so an operator and a coordinator racing each other
        cannot both move it. True when this call moved it."""
        return self.filter(pk=pk, state__in=list(allowed)).update(state=to, **fields) > 0


class Rollout(models.Model):
    class Strategy(models.TextChoices):
        ROLLING = "rolling"
        CANARY = "canary"
        BLUE_GREEN = "blue_green"
        # Back to each node's previous release (per tenant), rolling, leaders last
        ROLLBACK = "rollback"

    class State(models.TextChoices):
        PLANNED = "PLANNED"
        RUNNING = "RUNNING"
        AWAITING_APPROVAL = "AWAITING_APPROVAL"
        PAUSED = "PAUSED"
        CANCELLING = "CANCELLING"
        ABORTING = "ABORTING"
        COMPLETED = "COMPLETED"
        FAILED = "FAILED"
        CANCELLED = "CANCELLED"
        ABORTED = "ABORTED"

    ACTIVE_STATES = (
        State.RUNNING,
        State.AWAITING_APPROVAL,
        State.PAUSED,
        State.CANCELLING,
        State.ABORTING,
    )
    FINAL_STATES = (State.COMPLETED, State.FAILED, State.CANCELLED, State.ABORTED)

    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="rollouts")
    strategy = models.CharField(max_length=16, choices=Strategy.choices)
    state = models.CharField(max_length=20, choices=State.choices, default=State.PLANNED)
    name = models.CharField(max_length=200, blank=True)
    # What was targeted (cluster / tenant / filter), as chosen in the form
    target = models.JSONField(default=dict, blank=True)
    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="rollouts",
        help_text="set when every node belongs to one tenant",
    )
    cluster = models.ForeignKey(
        Cluster, on_delete=models.PROTECT, null=True, blank=True, related_name="rollouts"
    )
    # RolloutOptions.to_json(); read it as `opts`
    options = models.JSONField(default=dict, blank=True)
    current_stage = models.PositiveSmallIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # A planned rollout with a start time is started by the coordinator's beat at that time.
    start_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    # Single coordinator per rollout: a lease claimed by conditional UPDATE
    lease_owner = models.CharField(max_length=120, blank=True)
    lease_expires = models.DateTimeField(null=True, blank=True)
    # Fencing token: bumped on every claim; every write of a drive checks it is still current.
    lease_generation = models.PositiveBigIntegerField(default=0)
    # Blue/green: the colour this rollout makes active, recorded before the switch (idempotent).
    target_color = models.CharField(max_length=8, blank=True)

    objects = RolloutQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("approve_rollout", "Can approve, pause and abort rollouts")]

    def __str__(self) -> str:
        return self.name or f"{self.strategy} rollout {self.pk} of {self.release}"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def opts(self) -> RolloutOptions:
        """The options with their defaults filled in: the one way to read them."""
        return RolloutOptions.from_json(self.options)


class RolloutTemplate(models.Model):
    """Saved options for new rollouts: a strategy and every setting of the form but what to
    update and where (release, cluster, tenant, version filter, start time)."""

    name = models.CharField(max_length=120, unique=True)
    strategy = models.CharField(max_length=16, choices=Rollout.Strategy.choices)
    options = models.JSONField(default=dict)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def opts(self) -> RolloutOptions:
        return RolloutOptions.from_json(self.options)


class RolloutNode(models.Model):
    """One node's place in a rollout's plan and how far it got."""

    class State(models.TextChoices):
        PENDING = "PENDING"
        WAITING = "WAITING"
        RUNNING = "RUNNING"
        DONE = "DONE"
        FAILED = "FAILED"
        ROLLED_BACK = "ROLLED_BACK"
        SKIPPED = "SKIPPED"

    class ContractState(models.TextChoices):
        NONE = "", "—"
        WAITING = "WAITING"  # its cluster runs the release; the contract delay runs
        RUNNING = "RUNNING"
        DONE = "DONE"
        FAILED = "FAILED"
        SKIPPED = "SKIPPED"  # its cluster does not (all) run the release: not contracted

    CONTRACT_FINAL = (ContractState.DONE, ContractState.FAILED, ContractState.SKIPPED)

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="plan")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveIntegerField()
    stage = models.PositiveSmallIntegerField(default=0)
    is_leader = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    job = models.ForeignKey(
        UpdateJob, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    version_before = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Expand/contract: the node's contract step, once every node of its cluster runs the
    # release ("" while undecided, or when the release has no contract migrations).
    contract_state = models.CharField(max_length=8, choices=ContractState.choices, blank=True)
    contract_job = models.ForeignKey(
        UpdateJob, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # WAITING: when the rollout's contract_delay is over and the job may start.
    contract_due_at = models.DateTimeField(null=True, blank=True)
    # Why the step was skipped or failed.
    contract_note = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["rollout", "position"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "node"], name="rollout_node_once"),
            models.UniqueConstraint(fields=["rollout", "position"], name="rollout_position_once"),
        ]
        # A drive reads only the rows it can act on (in flight, the stage's next
        # candidates, a failed row, the contract step's rows), never the whole plan.
        indexes = [
            models.Index(fields=["rollout", "state", "position"], name="rollout_node_state"),
            models.Index(
                fields=["rollout", "stage", "state", "position"], name="rollout_node_stage"
            ),
            models.Index(fields=["rollout", "contract_state"], name="rollout_node_contract"),
        ]

    def __str__(self) -> str:
        return f"{self.rollout_id}#{self.position} {self.node_id} {self.state}"


class StageDecision(models.Model):
    """A promotion, approval, gate result or abort: who or what decided, when."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="decisions")
    stage = models.PositiveSmallIntegerField()
    decision = models.CharField(max_length=32)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_by_label = models.CharField(max_length=150)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"rollout {self.rollout_id} stage {self.stage}: {self.decision}"


class NodeCommand(models.Model):
    """The outbox: every command to a node's agent is a row, written in the transaction that
    causes it. A relay sends it after commit and re-sends it until the agent acknowledges it
    (its first report for the job, or a heartbeat showing the traffic role) or gives up."""

    class Kind(models.TextChoices):
        APPLY = "apply"
        ROLLBACK = "rollback"
        TRAFFIC_ROLE = "traffic_role"
        CANCEL = "cancel"
        CONTRACT = "contract"
        TRUST_STORE = "trust_store"

    class State(models.TextChoices):
        PENDING = "PENDING"  # written, never sent
        SENT = "SENT"  # sent at least once, not acknowledged yet
        ACKED = "ACKED"
        ABANDONED = "ABANDONED"  # out of attempts, or its job ended first

    OPEN_STATES = (State.PENDING, State.SENT)

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="commands")
    job = models.ForeignKey(
        UpdateJob, on_delete=models.CASCADE, null=True, blank=True, related_name="commands"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Fixed arguments (a traffic role, a restore point); what changes per send, such as a
    # download token, is made by the relay at each send.
    args = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    last_sent_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pk"]
        indexes = [models.Index(fields=["state", "next_attempt_at"], name="command_due")]

    def __str__(self) -> str:
        return f"{self.kind} command {self.pk} to {self.node_id} ({self.state})"


class ReleaseFeed(models.Model):
    """A source the dashboard polls for new signed releases: a GitHub-Releases-style API or a
    JSON index (docs/release-feeds.md). What a poll learnt (ETag, Last-Modified, the index's
    hash, the server's rate limit) is kept so the next poll costs the server nothing."""

    class Kind(models.TextChoices):
        GITHUB = "github", "GitHub Releases API"
        INDEX = "index", "JSON index"

    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    url = models.CharField(max_length=500)
    product = models.CharField(max_length=64, default="themisdb")
    channel = models.CharField(max_length=32, default="stable")
    enabled = models.BooleanField(default=True)
    poll_interval_seconds = models.PositiveIntegerField(default=900)
    # Fernet token of {"token": ...} as for notification channels (write-only, never shown);
    # `token_hint` is what the page may show instead.
    token = models.TextField(blank=True, editable=False)
    token_hint = models.CharField(max_length=64, blank=True, editable=False)
    # Conditional requests and manifest sync: stored only after a poll handled every entry.
    etag = models.CharField(max_length=512, blank=True)
    last_modified = models.CharField(max_length=64, blank=True)
    index_hash = models.CharField(max_length=128, blank=True)
    last_poll_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    next_poll_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # A poll task is queued or running until then (beat sends no second one meanwhile).
    queued_until = models.DateTimeField(null=True, blank=True)
    # The server asked for quiet until then (Retry-After, or its rate limit's reset).
    not_before = models.DateTimeField(null=True, blank=True)
    last_status = models.CharField(max_length=200, blank=True)
    rate_limit_limit = models.PositiveIntegerField(null=True, blank=True)
    rate_limit_remaining = models.PositiveIntegerField(null=True, blank=True)
    rate_limit_reset_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "pk"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} feed {self.name}"


class ReleaseFeedItem(models.Model):
    """One bundle a feed offered and what became of it: imported (a Release) or rejected.
    An asset seen once is not downloaded again until the feed offers it changed."""

    class Outcome(models.TextChoices):
        IMPORTED = "imported"
        REJECTED = "rejected"

    feed = models.ForeignKey(ReleaseFeed, on_delete=models.CASCADE, related_name="items")
    version = models.CharField(max_length=64)
    asset_name = models.CharField(max_length=255)
    url = models.CharField(max_length=1000)
    # SHA-256 over what identifies the asset in the feed (id, update time, size, URL, hash).
    fingerprint = models.CharField(max_length=64)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    release = models.ForeignKey(
        Release, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    code = models.CharField(max_length=32, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["feed", "fingerprint"], name="feed_item_once")
        ]

    def __str__(self) -> str:
        return f"{self.feed_id} {self.version} {self.outcome}"


class TrustStoreVersion(models.Model):
    """A signed trust store published to the fleet (updates.engine.truststore): the envelope
    as the nodes take it, and what it says."""

    version = models.PositiveIntegerField(unique=True)
    envelope = models.TextField()
    expires = models.DateTimeField()
    signer = models.CharField(max_length=255)
    roots = models.JSONField(default=list)  # the roots' subjects
    revoked = models.PositiveIntegerField(default=0)  # how many certificates it revokes
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"trust store version {self.version}"

"""What the API reads and writes, as DRF serializers (the API's forms). Input that a page form
already validates is handed to that form, so a rule is written once."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tenants.models import Blackout, Consent, MaintenanceWindow, Tenant, UpdatePolicy
from updates.api.models import ApiToken, Scope
from updates.jobs import selectors as plans
from updates.models import Event, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.notifications.forms import ChannelForm
from updates.notifications.kinds import Kind
from updates.notifications.models import Channel
from updates.releases.forms import ReleaseUploadForm


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error: a stable code, a message for people, and per-field messages when the
    request had invalid fields."""

    code = serializers.CharField()
    message = serializers.CharField()
    # The metaclass moves declared fields off the class, so this does not shadow
    # Serializer.fields at run time; only the type checker sees the clash.
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()), required=False
    )


class ReleaseSerializer(serializers.ModelSerializer[Release]):
    published_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )

    class Meta:
        model = Release
        fields = [
            "id",
            "product",
            "version",
            "channel",
            "state",
            "priority",
            "size",
            "sha256",
            "signer_subject",
            "created_at",
            "published_by",
        ]
        read_only_fields = fields


def _upload_channels() -> list[tuple[str, str]]:
    field = ReleaseUploadForm.base_fields["channel"]
    assert hasattr(field, "choices")
    return list(field.choices)


class ReleaseUploadSerializer(serializers.Serializer[Any]):
    """Documents the upload; the upload form validates it (the same rules as the page)."""

    bundle = serializers.FileField(help_text="a signed bundle (.tar or .tar.zst)")
    channel = serializers.ChoiceField(choices=_upload_channels(), default="stable")


class ComponentSerializer(serializers.Serializer[Any]):
    product = serializers.CharField(read_only=True)
    version = serializers.CharField(read_only=True)


class NodeSerializer(serializers.ModelSerializer[Node]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    cluster: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="name", read_only=True, allow_null=True
    )
    cluster_id = serializers.IntegerField(read_only=True, allow_null=True)
    components = serializers.SerializerMethodField(
        help_text="what the node runs, one release product each (the server first)"
    )

    class Meta:
        model = Node
        fields = [
            "node_id",
            "hostname",
            "tenant",
            "cluster",
            "cluster_id",
            "installed_version",
            "raft_role",
            "status",
            "last_heartbeat",
            "service_healthy",
            "error_rate",
            "p99_latency_ms",
            "color",
            "traffic_role",
            "disk_free_bytes",
            "disk_total_bytes",
            "memory_available_bytes",
            "restore_points_bytes",
            "components",
            "inventory",
        ]
        read_only_fields = fields

    @extend_schema_field(ComponentSerializer(many=True))
    def get_components(self, node: Node) -> list[dict[str, Any]]:
        # `components.all()` reads the list's prefetch, or one query for a single node.
        installed = plans.node_installed_versions(node, node.components.all())
        rows = plans.node_components(node, installed)
        return [{"product": row.product, "version": row.version} for row in rows]


class RestorePointSerializer(serializers.Serializer[Any]):
    id = serializers.CharField()
    version = serializers.CharField(required=False, allow_blank=True)
    created = serializers.CharField(required=False, allow_blank=True)


class PlanStepSerializer(serializers.Serializer[Any]):
    product = serializers.CharField(read_only=True)
    version = serializers.CharField(read_only=True)
    from_version = serializers.CharField(
        read_only=True, help_text='the version before ("" when the component is new)'
    )
    release_id = serializers.IntegerField(read_only=True)


class JobSerializer(serializers.ModelSerializer[UpdateJob]):
    node: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="node_id", read_only=True
    )
    release: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="version", read_only=True, allow_null=True
    )
    rollout: serializers.PrimaryKeyRelatedField[Any] = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True
    )
    plan = PlanStepSerializer(
        many=True,
        read_only=True,
        source="plan_steps",
        help_text="an update's releases in the order the node installs them (the job's"
        " own release is one of them); empty for rollbacks, contracts and older jobs",
    )
    failed_step = serializers.IntegerField(
        read_only=True,
        allow_null=True,
        help_text="the plan step (from 1) the node reported failing, if any",
    )

    class Meta:
        model = UpdateJob
        fields = [
            "id",
            "node",
            "kind",
            "state",
            "release",
            "restore_point",
            "rollout",
            "progress_percent",
            "step",
            "bytes_done",
            "bytes_total",
            "bytes_per_second",
            "eta_seconds",
            "wait_reason",
            "error_code",
            "error_message",
            "created_at",
            "started_at",
            "finished_at",
            "plan",
            "failed_step",
        ]
        read_only_fields = fields


class NodeDetailSerializer(NodeSerializer):
    restore_points = serializers.SerializerMethodField()
    jobs = serializers.SerializerMethodField()

    class Meta(NodeSerializer.Meta):
        fields = [*NodeSerializer.Meta.fields, "restore_points", "jobs"]
        read_only_fields = fields

    def get_restore_points(self, node: Node) -> list[dict[str, Any]]:
        points = [p for p in node.restore_points or [] if isinstance(p, dict)]
        return RestorePointSerializer(points, many=True).data  # type: ignore[return-value]

    def get_jobs(self, node: Node) -> list[dict[str, Any]]:
        jobs = node.jobs.select_related("release", "node").order_by("-created_at")[:50]
        return JobSerializer(jobs, many=True).data  # type: ignore[return-value]


class NodeUpdateSerializer(serializers.Serializer[Any]):
    release = serializers.IntegerField(min_value=1, max_value=2**63 - 1, help_text="release id")


class NodeRollbackSerializer(serializers.Serializer[Any]):
    point = serializers.CharField(max_length=128, help_text="restore point id")


class EndJobSerializer(serializers.Serializer[Any]):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class RolloutSerializer(serializers.ModelSerializer[Rollout]):
    release: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="version", read_only=True
    )
    release_id = serializers.IntegerField(read_only=True)
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )
    cluster: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="name", read_only=True, allow_null=True
    )
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Rollout
        fields = [
            "id",
            "name",
            "release",
            "release_id",
            "strategy",
            "state",
            "current_stage",
            "tenant",
            "cluster",
            "target",
            "options",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "error_message",
        ]
        read_only_fields = fields


class RolloutRowSerializer(serializers.ModelSerializer[RolloutNode]):
    node: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="node_id", read_only=True
    )
    job = JobSerializer(read_only=True, allow_null=True)

    class Meta:
        model = RolloutNode
        fields = [
            "node",
            "position",
            "stage",
            "is_leader",
            "state",
            "version_before",
            "attempts",
            "job",
        ]
        read_only_fields = fields


class DecisionSerializer(serializers.ModelSerializer[StageDecision]):
    class Meta:
        model = StageDecision
        fields = ["stage", "decision", "decided_by_label", "created_at"]
        read_only_fields = fields


class ProgressSerializer(serializers.Serializer[Any]):
    nodes_updated = serializers.IntegerField()
    nodes_total = serializers.IntegerField()
    current_node = serializers.CharField(allow_null=True)
    status = serializers.CharField()
    counts = serializers.DictField(child=serializers.IntegerField())


class RolloutStatusSerializer(serializers.Serializer[Any]):
    """A rollout as its page shows it to this user: a tenant admin sees their tenants' nodes
    and only a count per state of the others."""

    rollout = RolloutSerializer()
    progress = ProgressSerializer()
    nodes = RolloutRowSerializer(many=True)
    hidden_counts = serializers.DictField(child=serializers.IntegerField())
    decisions = DecisionSerializer(many=True)


class RolloutRequestSerializer(serializers.Serializer[Any]):
    """A rollout to preview or create. The fields are the new-rollout page's; the page's form
    checks them. Percentages as on the page: `stages` [1, 5, 25, 100], `max_error_rate` 5."""

    release = serializers.IntegerField(min_value=1, max_value=2**63 - 1, help_text="release id")
    strategy = serializers.ChoiceField(choices=Rollout.Strategy.choices, default="canary")
    cluster = serializers.IntegerField(
        min_value=1, max_value=2**63 - 1, required=False, allow_null=True, help_text="cluster id"
    )
    tenant = serializers.SlugField(required=False, allow_blank=True, help_text="tenant slug")
    version_filter = serializers.CharField(required=False, allow_blank=True, max_length=64)
    stages = serializers.ListField(
        child=serializers.FloatField(min_value=0, max_value=100),
        required=False,
        min_length=1,
        max_length=20,
        help_text="canary stages in percent, increasing, ending at 100",
    )
    auto_promote = serializers.BooleanField(required=False)
    automatic_final = serializers.BooleanField(required=False)
    max_error_rate = serializers.FloatField(required=False, help_text="percent")
    max_p99_ms = serializers.FloatField(required=False)
    bake_seconds = serializers.IntegerField(required=False, allow_null=True)
    max_parallel = serializers.IntegerField(required=False, allow_null=True)
    max_unavailable = serializers.IntegerField(required=False)
    parallel = serializers.BooleanField(required=False)
    health_timeout = serializers.IntegerField(required=False)
    rollback_on_failure = serializers.BooleanField(required=False)
    ack_timeout = serializers.IntegerField(required=False, allow_null=True)
    max_sends = serializers.IntegerField(required=False, allow_null=True)
    progress_timeout = serializers.IntegerField(required=False, allow_null=True)
    offline_grace = serializers.IntegerField(required=False, allow_null=True)
    contract_delay = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="seconds between every node of a cluster running the release and its"
        " contract migrations (0: at once)",
    )


class RolloutCreateSerializer(RolloutRequestSerializer):
    start = serializers.BooleanField(
        default=True, help_text="start at once (false: created PLANNED, start it later)"
    )


class PlannedNodeSerializer(serializers.Serializer[Any]):
    node = serializers.CharField()
    position = serializers.IntegerField()
    stage = serializers.IntegerField()
    is_leader = serializers.BooleanField()


class SkippedNodeSerializer(serializers.Serializer[Any]):
    node = serializers.CharField()
    reason = serializers.CharField()


class PlanSerializer(serializers.Serializer[Any]):
    stage_sizes = serializers.ListField(child=serializers.IntegerField())
    nodes = PlannedNodeSerializer(many=True)
    skipped = SkippedNodeSerializer(many=True)


class EventSerializer(serializers.ModelSerializer[Event]):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )

    class Meta:
        model = Event
        fields = [
            "id",
            "created_at",
            "verb",
            "actor_label",
            "tenant",
            "object_type",
            "object_id",
            "details",
        ]
        read_only_fields = fields


class TokenSerializer(serializers.ModelSerializer[ApiToken]):
    """A token as its owner sees it: never the secret, nor its digest."""

    scopes = serializers.ListField(child=serializers.ChoiceField(choices=Scope.choices))

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "prefix",
            "scopes",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        ]
        read_only_fields = fields


def paginated(item: type[serializers.Serializer[Any]], *, cursor: bool = False) -> Any:
    """The schema of one page of `item`s: count (page numbers only), next, previous, results."""
    fields: dict[str, Any] = {
        "next": serializers.URLField(allow_null=True),
        "previous": serializers.URLField(allow_null=True),
        "results": item(many=True),
    }
    if not cursor:
        fields["count"] = serializers.IntegerField()
    name = f"Paginated{item.__name__.removesuffix('Serializer')}List"
    return type(name, (serializers.Serializer,), fields)


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    class Meta:
        model = Tenant
        fields = ["slug", "name", "created_at"]
        read_only_fields = fields


class WindowSerializer(serializers.ModelSerializer[MaintenanceWindow]):
    class Meta:
        model = MaintenanceWindow
        fields = ["id", "days", "start_time", "end_time", "timezone", "label"]
        read_only_fields = fields


class BlackoutSerializer(serializers.ModelSerializer[Blackout]):
    fleet_wide = serializers.BooleanField(read_only=True, help_text="for every tenant")

    class Meta:
        model = Blackout
        fields = ["id", "name", "starts_at", "ends_at", "timezone", "yearly", "fleet_wide"]
        read_only_fields = fields


class PolicySerializer(serializers.ModelSerializer[UpdatePolicy]):
    class Meta:
        model = UpdatePolicy
        fields = [
            "auto_update",
            "auto_apply_critical",
            "requires_consent",
            "notify_lead_minutes",
            "consent_valid_days",
        ]
        read_only_fields = fields


class ConsentSerializer(serializers.ModelSerializer[Consent]):
    release: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="version", read_only=True
    )
    decided_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Consent
        fields = ["release", "decision", "reason", "decided_by", "decided_at", "expires_at"]
        read_only_fields = fields


class PendingConsentSerializer(serializers.Serializer[Any]):
    """A release this tenant's nodes wait to be consented to, as the tenant page lists it."""

    release = serializers.CharField(source="release.version", read_only=True)
    release_id = serializers.IntegerField(source="release.pk", read_only=True)
    since = serializers.DateTimeField(read_only=True, help_text="the oldest waiting job's")
    nodes = serializers.SerializerMethodField()
    consent = ConsentSerializer(
        read_only=True, allow_null=True, help_text="a decline or an expired grant, if any"
    )

    def get_nodes(self, pending: Any) -> list[str]:
        return [job.node.node_id for job in pending.jobs]


class TenantDetailSerializer(serializers.Serializer[Any]):
    """A tenant as its page shows it: schedule, policy, the releases waiting for consent and
    the consent decisions."""

    tenant = TenantSerializer()
    can_edit = serializers.BooleanField()
    policy = PolicySerializer()
    windows = WindowSerializer(many=True)
    blackouts = BlackoutSerializer(many=True)
    pending_consents = PendingConsentSerializer(many=True)
    consents = ConsentSerializer(many=True)


class ConsentDecisionSerializer(serializers.Serializer[Any]):
    """Documents a consent decision; the tenant page's consent form validates it."""

    release = serializers.IntegerField(min_value=1, max_value=2**63 - 1, help_text="release id")
    decision = serializers.ChoiceField(choices=[("grant", "grant"), ("decline", "decline")])
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True)
    valid_days = serializers.IntegerField(min_value=1, max_value=365, required=False)


class ChannelSerializer(serializers.ModelSerializer[Channel]):
    """A notification channel without its secrets: only the hints the channel page shows."""

    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )
    kinds = serializers.ListField(child=serializers.CharField(), read_only=True)
    secret_hints = serializers.DictField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Channel
        fields = [
            "id",
            "name",
            "type",
            "tenant",
            "kinds",
            "enabled",
            "secret_hints",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


def _channel_max(name: str) -> int:
    """The channel page's form's limit for a field: the form stays the one rule."""
    limit = getattr(ChannelForm.base_fields[name], "max_length", None)
    assert isinstance(limit, int)
    return limit


def _secret(name: str, help_text: str) -> serializers.CharField:
    # Never in an answer: only the masked hint (`secret_hints`) comes back.
    return serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        max_length=_channel_max(name),
        help_text=help_text,
    )


class ChannelUpdateSerializer(serializers.Serializer[Any]):
    """A change to a channel, as its edit page takes it; the page's form checks it. A field
    left out keeps its value, a secret left out or empty keeps the stored one. Type and tenant
    are fixed once created (sending them unchanged is allowed)."""

    name = serializers.CharField(max_length=_channel_max("name"), required=False)
    type = serializers.ChoiceField(choices=Channel.Type.choices, required=False)
    tenant = serializers.SlugField(
        required=False, allow_null=True, allow_blank=True, help_text="tenant slug; null: fleet-wide"
    )
    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=Kind.choices),
        required=False,
        min_length=1,
        help_text="the events to send (PagerDuty keeps only those it can act on)",
    )
    enabled = serializers.BooleanField(required=False)
    url = _secret("url", "Slack incoming-webhook URL, or the signed webhook's endpoint (secret)")
    routing_key = _secret("routing_key", "PagerDuty routing key (secret)")
    signing_secret = _secret("signing_secret", "the signed webhook's key, 16+ characters (secret)")


class ChannelCreateSerializer(ChannelUpdateSerializer):
    """A new channel, as the channel page's form takes it; the form checks it (secrets the
    type needs: slack `url`, pagerduty `routing_key`, webhook `url` and `signing_secret`)."""

    name = serializers.CharField(max_length=_channel_max("name"))
    type = serializers.ChoiceField(choices=Channel.Type.choices)
    tenant = serializers.SlugField(
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="tenant slug; left out or null: fleet-wide (operators only)",
    )
    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=Kind.choices),
        min_length=1,
        help_text="the events to send (PagerDuty keeps only those it can act on)",
    )
    enabled = serializers.BooleanField(default=True)


class PolicyRequestSerializer(serializers.Serializer[Any]):
    """A tenant's update policy; a field left out keeps its current value."""

    auto_update = serializers.BooleanField(required=False)
    auto_apply_critical = serializers.BooleanField(required=False)
    requires_consent = serializers.BooleanField(required=False)
    notify_lead_minutes = serializers.IntegerField(required=False, min_value=0, max_value=10080)
    consent_valid_days = serializers.IntegerField(required=False, min_value=1, max_value=365)


class WindowRequestSerializer(serializers.Serializer[Any]):
    """A weekly maintenance window, as the tenant page's form takes it."""

    days = serializers.ListField(
        child=serializers.IntegerField(min_value=0, max_value=6),
        min_length=1,
        max_length=7,
        help_text="weekdays, Monday = 0",
    )
    start_time = serializers.TimeField()
    end_time = serializers.TimeField(help_text="at or before the start: runs past midnight")
    timezone = serializers.CharField(max_length=64, help_text="IANA name, e.g. Europe/Berlin")
    # Declared fields leave the class (the metaclass collects them): no clash with Field.label
    # at run time, only for the type checker.
    label = serializers.CharField(  # type: ignore[assignment]
        max_length=80, required=False, allow_blank=True, default=""
    )


class BlackoutRequestSerializer(serializers.Serializer[Any]):
    """A blackout, in the wall time of its timezone, as the tenant page's form takes it."""

    name = serializers.CharField(max_length=120)
    starts_local = serializers.CharField(max_length=32, help_text="YYYY-MM-DDTHH:MM, local time")
    ends_local = serializers.CharField(max_length=32, help_text="YYYY-MM-DDTHH:MM, local time")
    timezone = serializers.CharField(max_length=64, default="UTC")
    yearly = serializers.BooleanField(default=False)

"""The new-rollout form: what to target, how, and the safety settings."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from tenants.models import Tenant
from updates.models import Cluster, Node, NodeGroup, Release, Rollout, RolloutTemplate
from updates.rollout_options import (
    MAX_CONTRACT_DELAY,
    GateOptions,
    RolloutOptions,
    StageOptions,
)
from updates.rollouts.plan import PlanError, parse_stages
from updates.rollouts.selectors import RolloutFilter, RolloutPhase

# Initial values come from the option defaults; the form shows rates in percent.
DEFAULTS = RolloutOptions()
# The plan is worked out when the rollout is created: a start far ahead would run a stale one.
MAX_SCHEDULE_AHEAD = timedelta(days=30)


class RolloutForm(forms.Form):
    release = forms.ModelChoiceField(queryset=Release.objects.none())
    strategy = forms.ChoiceField(choices=Rollout.Strategy.choices, initial="canary")
    cluster = forms.ModelChoiceField(queryset=Cluster.objects.none(), required=False)
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), required=False)
    group = forms.ModelChoiceField(
        queryset=NodeGroup.objects.none(),
        required=False,
        help_text="a saved fleet filter: the nodes it matches when the plan is made",
    )
    version_filter = forms.CharField(
        required=False, max_length=64, help_text="only nodes whose version matches, e.g. <1.7"
    )
    stages = forms.CharField(
        initial=", ".join(f"{f * 100:g}" for f in DEFAULTS.stage_fractions),
        help_text="canary stages in percent",
    )
    auto_promote = forms.BooleanField(
        required=False,
        initial=any(s.auto_promote for s in DEFAULTS.stages),
        help_text="promote between intermediate stages when the gate passes",
    )
    automatic_final = forms.BooleanField(
        required=False,
        initial=DEFAULTS.gate.automatic,
        help_text="let a passing gate go to 100 % without an approval",
    )
    max_error_rate = forms.FloatField(
        initial=round(DEFAULTS.gate.max_error_rate * 100, 6),
        min_value=0,
        max_value=100,
        label="Max error rate %",
    )
    max_p99_ms = forms.FloatField(
        initial=int(DEFAULTS.gate.max_p99_ms), min_value=1, label="Max p99 latency (ms)"
    )
    bake_seconds = forms.IntegerField(
        required=False,
        initial=DEFAULTS.gate.bake_seconds,
        min_value=0,
        max_value=86400,
        label="Bake time (s)",
        help_text="wait after a stage before the gate reads the metrics",
    )
    max_parallel = forms.IntegerField(
        required=False,
        initial=DEFAULTS.max_parallel,
        min_value=0,
        max_value=100000,
        label="Max nodes at once",
        help_text="fleet-wide cap on nodes updating at the same time (0: no cap)",
    )
    max_unavailable = forms.IntegerField(
        initial=DEFAULTS.max_unavailable, min_value=1, max_value=100
    )
    parallel = forms.BooleanField(required=False, initial=DEFAULTS.parallel)
    health_timeout = forms.IntegerField(
        initial=DEFAULTS.health_timeout, min_value=1, max_value=3600
    )
    rollback_on_failure = forms.BooleanField(required=False, initial=DEFAULTS.rollback_on_failure)
    # Job deadlines; the initial values are the settings' defaults when the form is shown.
    ack_timeout = forms.IntegerField(
        required=False,
        initial=lambda: RolloutOptions().ack_timeout,
        min_value=1,
        max_value=3600,
        label="Re-send after (s)",
        help_text="a command the agent has not acknowledged is sent again, up to the sends",
    )
    max_sends = forms.IntegerField(
        required=False,
        initial=lambda: RolloutOptions().max_sends,
        min_value=1,
        max_value=100,
        label="Sends",
    )
    progress_timeout = forms.IntegerField(
        required=False,
        initial=lambda: RolloutOptions().progress_timeout,
        min_value=1,
        max_value=86400,
        label="No progress for (s)",
        help_text="a running job that reports nothing this long ends as lost",
    )
    offline_grace = forms.IntegerField(
        required=False,
        initial=lambda: RolloutOptions().offline_grace,
        min_value=0,
        max_value=86400,
        label="Node offline for (s)",
        help_text="a job whose node stays offline this long ends as lost",
    )

    four_eyes = forms.BooleanField(
        required=False,
        label="Four eyes",
        help_text="a canary's promotion needs someone other than who started it",
    )
    start_at = forms.DateTimeField(
        required=False,
        label="Start at (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}),
        help_text="blank: start now; else the rollout waits, planned, until then",
    )
    contract_delay = forms.IntegerField(
        required=False,
        initial=DEFAULTS.contract_delay,
        min_value=0,
        max_value=MAX_CONTRACT_DELAY,
        label="Contract delay (s)",
        help_text="wait this long after every node of a cluster runs the release before its"
        " contract migrations run",
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        self._choose_from("release", Release.objects.filter(state=Release.State.PUBLISHED))
        self._choose_from("cluster", Cluster.objects.visible_to(user))
        self._choose_from("tenant", Tenant.objects.visible_to(user))
        self._choose_from("group", NodeGroup.objects.all())

    def _choose_from(self, name: str, queryset: QuerySet[Any]) -> None:
        """Limit a model choice field to what this user may pick."""
        field = self.fields[name]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = queryset

    def clean_version_filter(self) -> str:
        text = str(self.cleaned_data["version_filter"]).strip()
        if text:
            try:
                SpecifierSet(text)
            except InvalidSpecifier:
                raise forms.ValidationError(f"{text!r} is not a version specifier") from None
        return text

    def clean_stages(self) -> tuple[float, ...]:
        try:
            return parse_stages(self.cleaned_data["stages"])
        except PlanError as err:
            raise forms.ValidationError(str(err)) from None

    def clean_start_at(self) -> datetime | None:
        start_at: datetime | None = self.cleaned_data.get("start_at")
        if start_at is None:
            return None
        now = timezone.now()
        if start_at <= now:
            raise forms.ValidationError("The start time has passed: leave it blank to start now.")
        if start_at > now + MAX_SCHEDULE_AHEAD:
            raise forms.ValidationError(
                f"At most {MAX_SCHEDULE_AHEAD.days} days ahead: the plan is worked out now."
            )
        return start_at

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        defaults = RolloutOptions()
        # Left blank: the settings' default.
        for name in ("ack_timeout", "max_sends", "progress_timeout", "offline_grace"):
            if data.get(name) is None and name not in self.errors:
                data[name] = getattr(defaults, name)
        longest = max(
            data.get("ack_timeout", 0) * data.get("max_sends", 0),
            data.get("progress_timeout", 0),
            settings.THEMIS_NODE_OFFLINE_AFTER + data.get("offline_grace", 0),
        )
        # The broker redelivers an unacknowledged message after its visibility timeout;
        # a deadline longer than that would let a message come back before the job ends.
        limit = int(settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]) // 2
        if longest > limit:
            raise forms.ValidationError(
                f"job deadlines up to {longest} s exceed what the broker allows ({limit} s)"
            )
        return data

    def target_nodes(self) -> list[Node]:
        data = self.cleaned_data
        nodes = Node.objects.visible_to(self.user).select_related("cluster", "tenant")
        if data.get("group"):
            nodes = data["group"].nodes(nodes)
        if data.get("cluster"):
            nodes = nodes.filter(cluster=data["cluster"])
        if data.get("tenant"):
            nodes = nodes.filter(tenant=data["tenant"])
        spec = SpecifierSet(data["version_filter"]) if data.get("version_filter") else None
        return [n for n in nodes.order_by("node_id") if _matches(spec, n.installed_version)]

    def target_description(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "cluster": data["cluster"].name if data.get("cluster") else None,
            "tenant": data["tenant"].name if data.get("tenant") else None,
            "version_filter": data.get("version_filter") or None,
            **(
                {"group": data["group"].name, "group_filter": data["group"].query}
                if data.get("group")
                else {}
            ),
        }

    def options(self) -> RolloutOptions:
        data = self.cleaned_data
        return RolloutOptions(
            max_unavailable=data["max_unavailable"],
            parallel=data["parallel"],
            health_timeout=data["health_timeout"],
            max_parallel=data.get("max_parallel") or 0,
            rollback_on_failure=data["rollback_on_failure"],
            stages=tuple(
                StageOptions(fraction=f, auto_promote=bool(data["auto_promote"]) and f < 1)
                for f in data["stages"]
            ),
            gate=GateOptions(
                max_error_rate=data["max_error_rate"] / 100,
                max_p99_ms=data["max_p99_ms"],
                automatic=data["automatic_final"],
                bake_seconds=data.get("bake_seconds") or 0,
            ),
            ack_timeout=data["ack_timeout"],
            max_sends=data["max_sends"],
            progress_timeout=data["progress_timeout"],
            offline_grace=data["offline_grace"],
            contract_delay=data.get("contract_delay") or 0,
            four_eyes=bool(data.get("four_eyes")),
        )


def _matches(spec: SpecifierSet | None, version: str) -> bool:
    if spec is None:
        return True
    try:
        return Version(version) in spec
    except InvalidVersion:
        return False


class RolloutFilterForm(forms.Form):
    """The rollouts list's query string; a bad value is named and left out."""

    phase = forms.ChoiceField(
        required=False, choices=[("", "any phase"), *RolloutPhase.choices], label="Phase"
    )
    state = forms.ChoiceField(
        required=False, choices=[("", "any state"), *Rollout.State.choices], label="State"
    )
    strategy = forms.ChoiceField(
        required=False, choices=[("", "any strategy"), *Rollout.Strategy.choices], label="Strategy"
    )
    version = forms.CharField(required=False, max_length=64, label="Release version")
    sort = forms.ChoiceField(
        required=False, choices=[("", "newest first"), ("oldest", "oldest first")], label="Order"
    )

    def to_filter(self) -> RolloutFilter:
        self.is_valid()
        data = {k: v for k, v in getattr(self, "cleaned_data", {}).items() if k not in self.errors}
        return RolloutFilter(
            phase=data.get("phase") or "",
            state=data.get("state") or "",
            strategy=data.get("strategy") or "",
            version=(data.get("version") or "").strip(),
            oldest_first=data.get("sort") == "oldest",
        )


def initial_from_template(template: RolloutTemplate) -> dict[str, Any]:
    """The form's values for a template's saved options (rates back in percent)."""
    options = template.opts
    return {
        "strategy": template.strategy,
        "stages": ", ".join(f"{f * 100:g}" for f in options.stage_fractions),
        "auto_promote": any(s.auto_promote for s in options.stages),
        "automatic_final": options.gate.automatic,
        "max_error_rate": round(options.gate.max_error_rate * 100, 6),
        "max_p99_ms": options.gate.max_p99_ms,
        "bake_seconds": options.gate.bake_seconds,
        "four_eyes": options.four_eyes,
        "max_unavailable": options.max_unavailable,
        "parallel": options.parallel,
        "max_parallel": options.max_parallel,
        "health_timeout": options.health_timeout,
        "rollback_on_failure": options.rollback_on_failure,
        "contract_delay": options.contract_delay,
        "ack_timeout": options.ack_timeout,
        "max_sends": options.max_sends,
        "progress_timeout": options.progress_timeout,
        "offline_grace": options.offline_grace,
    }

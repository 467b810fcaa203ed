"""Rollout pages: list, plan-and-start, live detail, and the actions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from tenants.roles import APPROVE_ROLLOUT, START_UPDATE
from tenants.selectors import get_tenant_for_user
from themis_dashboard.htmx import HtmxHttpRequest, partial_template
from updates.jobs import selectors as plans
from updates.live.pages import live_part
from updates.live.services import Topic
from updates.live.streams import StreamAnswer, stream_response
from updates.models import Cluster, RolloutTemplate
from updates.rollouts import selectors
from updates.rollouts import services as rollouts
from updates.rollouts.bluegreen import blue_green_switch
from updates.rollouts.charts import metrics_chart_svg, stage_timeline_svg
from updates.rollouts.forms import RolloutFilterForm, RolloutForm, initial_from_template
from updates.rollouts.plan import PlanError

ACTIVE_POLL_MS = 500
# Beside the stream: the gate's metrics come with heartbeats, which announce nothing.
ROLLOUT_SLOW_POLL_SECONDS = 5


def _acting_user(request: HttpRequest) -> User:
    """The signed-in user behind an action; the permission checks in front of
    every action view already turned anonymous visitors away."""
    if not isinstance(request.user, User):
        raise PermissionDenied
    return request.user


@require_GET
def rollout_list(request: HttpRequest) -> HttpResponse:
    """The rollouts as filtered, and what updates to their releases achieved."""
    form = RolloutFilterForm(request.GET)
    items = selectors.rollouts_filtered(request.user, form.to_filter())
    releases = list({r.release_id: r.release for r in items}.values())[:RELEASES_SHOWN]
    context = {
        "form": form,
        "rollouts": items,
        "outcomes": selectors.release_outcomes(request.user, releases),
    }
    return render(request, "updates/rollouts.html", context)


# Releases whose outcomes the list shows: those of the rollouts listed, newest first.
RELEASES_SHOWN = 10


@require_http_methods(["GET", "POST"])
@permission_required(START_UPDATE, raise_exception=True)
def rollout_new(request: HttpRequest) -> HttpResponse:
    """GET: the form. POST 'preview': the plan, nothing saved. POST 'start':
    create and start the rollout exactly as previewed."""
    wanted = request.GET.get("template", "")
    template = (
        RolloutTemplate.objects.filter(pk=int(wanted)).first()
        if wanted.isdigit() and len(wanted) < 10
        else None
    )
    initial = initial_from_template(template) if template else None
    form = RolloutForm(request.POST or None, user=request.user, initial=initial)
    context: dict[str, Any] = {
        "form": form,
        "templates": RolloutTemplate.objects.all(),
        "template": template,
    }
    if request.method == "POST" and "save_template" in request.POST and form.is_valid():
        try:
            saved = rollouts.rollout_template_save(
                name=request.POST.get("template_name", ""),
                strategy=form.cleaned_data["strategy"],
                options=form.options(),
                user=_acting_user(request),
            )
        except rollouts.RolloutError as refused:
            form.add_error(None, str(refused))
        else:
            messages.success(request, f"Template {saved.name!r} saved.")
            return redirect(f"{reverse('rollout_new')}?template={saved.pk}")
    elif request.method == "POST" and form.is_valid():
        nodes = form.target_nodes()
        release, strategy = form.cleaned_data["release"], form.cleaned_data["strategy"]
        try:
            plan = rollouts.rollout_preview(
                release=release, strategy=strategy, nodes=nodes, options=form.options()
            )
            if "start" in request.POST:
                user = _acting_user(request)
                rollout = rollouts.rollout_create(
                    release=release,
                    strategy=strategy,
                    nodes=nodes,
                    user=user,
                    target=form.target_description(),
                    options=form.options(),
                )
                start_at = form.cleaned_data.get("start_at")
                if start_at is not None:
                    rollouts.rollout_schedule(rollout=rollout, user=user, start_at=start_at)
                    messages.success(
                        request,
                        f"Rollout {rollout.pk} starts at {start_at:%Y-%m-%d %H:%M:%S} UTC.",
                    )
                else:
                    rollouts.rollout_start(rollout=rollout, user=user)
                    messages.success(request, f"Rollout {rollout.pk} started.")
                return redirect("rollout_detail", rollout_id=rollout.pk)
            context["plan"] = plan
            planned = {p.node.pk for p in plan.nodes}
            context["component_plans"] = plans.plan_groups_for_nodes(
                release, [n for n in nodes if n.pk in planned]
            )
            context["schema_steps"] = selectors.plan_schema_steps(
                release, plan, contract_delay=form.options().contract_delay
            )
        except PlanError as err:
            form.add_error(None, str(err))
    status = 400 if request.method == "POST" and form.errors else 200
    return render(request, "updates/rollout_new.html", context, status=status)


@require_GET
def rollout_detail(request: HtmxHttpRequest, rollout_id: int) -> HttpResponse:
    rollout = selectors.get_rollout_for_user(request.user, rollout_id)
    page = selectors.rollout_detail_for_user(
        request.user,
        rollout,
        state=request.GET.get("state", ""),
        page=_page_number(request.GET.get("page")),
        at=timezone.now(),
    )
    context = {
        "rollout": rollout,
        "page": page,
        "lines": page.lines,
        "hidden_counts": page.hidden_counts,
        "hidden_total": page.hidden_total,
        "progress": page.progress,
        # A decision's details may name other tenants' nodes: only for who sees them all.
        "decisions": rollout.decisions.all(),
        "show_decision_details": page.sees_everything,
        "timeline_svg": stage_timeline_svg(rollout, page.stage_counts),
        "metrics": page.metrics,
        "metrics_svg": metrics_chart_svg(page.metrics, rollout.opts.gate),
        "schema_steps": selectors.rollout_schema_lines(rollout, page.schema_nodes),
        # Live while running (told by its stream; polled every half second while the stream
        # is down: progress is on screen within ~0.6 s either way, bench/bench_progress.py).
        # A scheduled rollout is watched too: the page shows it start.
        "live_part": live_part(
            active=rollout.is_active or bool(rollout.start_at),
            stream_url=reverse("live_rollout", args=[rollout.pk]),
            fast_ms=ACTIVE_POLL_MS,
            slow_seconds=ROLLOUT_SLOW_POLL_SECONDS,
        ),
        # The poll asks for the table the user is looking at (filter and page).
        "poll_query": request.GET.urlencode(),
        "can_operate": request.user.has_perm(START_UPDATE),
        "can_approve": request.user.has_perm(APPROVE_ROLLOUT),
        "needs_other_approver": rollouts.needs_other_approver(rollout, request.user),
    }
    return render(
        request, partial_template(request, "updates/rollout_detail.html", "live"), context
    )


@require_GET
def rollout_stream(request: HtmxHttpRequest, rollout_id: int) -> StreamAnswer:
    """The event stream of a rollout's page (404 for a rollout the user may not see)."""
    rollout = selectors.get_rollout_for_user(request.user, rollout_id)
    return stream_response((Topic.rollout(rollout.pk),))


def _page_number(raw: str | None) -> int:
    """A page number from the query string; anything else is the first page."""
    return int(raw) if raw and raw.isdigit() and len(raw) < 7 else 1


def _action(service: Callable[..., Any], done: str) -> Callable[[HttpRequest, int], HttpResponse]:
    def view(request: HttpRequest, rollout_id: int) -> HttpResponse:
        rollout = selectors.get_rollout_for_user(request.user, rollout_id)
        try:
            service(rollout=rollout, user=_acting_user(request))
        except rollouts.RolloutError as err:
            messages.error(request, str(err))
        else:
            messages.success(request, f"Rollout {rollout.pk} {done}.")
        return redirect("rollout_detail", rollout_id=rollout.pk)

    return require_POST(view)


approve_required = permission_required(APPROVE_ROLLOUT, raise_exception=True)
operate_required = permission_required(START_UPDATE, raise_exception=True)

rollout_approve = approve_required(_action(rollouts.rollout_approve, "promoted"))
rollout_pause = approve_required(_action(rollouts.rollout_pause, "paused"))
rollout_resume = approve_required(_action(rollouts.rollout_resume, "resumed"))
rollout_abort = approve_required(_action(rollouts.rollout_abort, "is rolling back"))
rollout_cancel = operate_required(_action(rollouts.rollout_cancel, "is stopping"))
rollout_retry = operate_required(_action(rollouts.rollout_retry_failed, "retries its failed nodes"))


@require_POST
@permission_required(START_UPDATE, raise_exception=True)
def cluster_switch_color(request: HttpRequest, cluster_id: int) -> HttpResponse:
    """Blue/green: switch traffic back (or over) to the other colour in one click."""
    cluster = get_object_or_404(Cluster.objects.visible_to(request.user), pk=cluster_id)
    if cluster.active_color not in {"blue", "green"}:
        messages.error(request, f"cluster {cluster.name} does not use blue/green")
    else:
        color = blue_green_switch(
            rollout=None, switch=None, user=_acting_user(request), cluster=cluster
        )
        messages.success(request, f"{cluster.name} now serves from {color}.")
    target = _same_site_path(request, request.POST.get("next"))
    return HttpResponseRedirect(target) if target else redirect("rollout_list")


def _same_site_path(request: HttpRequest, target: str | None) -> str | None:
    """`target` when it is an absolute path on this site; None for anything else (no open
    redirect, no view name to resolve)."""
    if (
        target
        and target.startswith("/")
        and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        )
    ):
        return target
    return None


@require_POST
@permission_required(START_UPDATE, raise_exception=True)
def tenant_rollback(request: HttpRequest, slug: str) -> HttpResponse:
    """Roll back every node of one tenant to its previous release."""

    tenant = get_tenant_for_user(request.user, slug)
    try:
        rollout = rollouts.tenant_rollback_start(tenant=tenant, user=_acting_user(request))
    except PlanError as err:
        messages.error(request, str(err))
        return redirect("tenant_rollback_plan", slug=tenant.slug)
    messages.success(request, f"Rolling back {tenant.name}: rollout {rollout.pk}.")
    return redirect("rollout_detail", rollout_id=rollout.pk)

"""Dashboard pages. Thin: fetch through scoped selectors, render."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render, resolve_url
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from tenants.roles import PUBLISH_RELEASE, START_UPDATE
from themis_dashboard.htmx import HtmxHttpRequest, partial_template
from updates.engine.truststore import MAX_ENVELOPE_BYTES
from updates.fleet import node_keys, selectors, services, trust_stores
from updates.fleet.forms import FleetFilterForm
from updates.jobs import selectors as plans
from updates.jobs.services import (
    JobConflict,
    PlanRefused,
    job_cancel,
    job_end_by_operator,
    job_start_rollback,
    job_start_update,
)
from updates.live.pages import live_part
from updates.live.services import Topic
from updates.live.streams import StreamAnswer, stream_response
from updates.models import NodeGroup, Release, TrustStoreVersion, UpdateJob

# A running job's page beside its stream: a lost announcement shows this late at worst.
JOB_SLOW_POLL_SECONDS = 10


@require_GET
def fleet(request: HtmxHttpRequest) -> HttpResponse:
    """The fleet's summary and one page of node tiles, as the query string asks."""
    tenants = selectors.fleet_tenants(request.user)
    # The version first: a write landing while the page is read makes the next poll
    # send it again rather than miss it.
    version = selectors.fleet_version(tenants)
    form = FleetFilterForm(request.GET, tenants=tenants)
    page = selectors.fleet_page(tenants, form.to_filter(), request.GET.get("page"))
    can_act = request.user.has_perm(START_UPDATE)
    context = {
        "form": form,
        "page": page,
        "query": form.as_query(page.number),
        "layout": form.chosen_layout(),
        "summary": selectors.fleet_summary(tenants),
        "version": version,
        "poll_seconds": settings.THEMIS_FLEET_POLL_SECONDS,
        "can_act": can_act,
        "groups": [GroupLink(g.name, group_url(g)) for g in NodeGroup.objects.all()]
        if can_act and not request.htmx
        else [],
    }
    return render(request, partial_template(request, "updates/fleet.html", "grid"), context)


@dataclass(frozen=True)
class GroupLink:
    name: str
    url: str


@require_http_methods(["GET", "POST"])
@permission_required(START_UPDATE, raise_exception=True)
def fleet_bulk(request: HtmxHttpRequest) -> HttpResponse:
    """An action on the nodes selected on the fleet page: GET lists what each node will do,
    POST does it (each node through the same service as its own page) and lists the
    outcome per node."""
    data = request.POST if request.method == "POST" else request.GET
    try:
        action = services.BulkAction(data.get("action", ""))
    except ValueError:
        return _bulk_refused(request, "Choose an action: update, roll back, end job, tag or untag.")
    node_ids = [n for n in data.getlist("node") if n][: services.MAX_BULK_NODES + 1]
    if not node_ids:
        return _bulk_refused(request, "Select at least one node on the fleet page.")
    if len(node_ids) > services.MAX_BULK_NODES:
        return _bulk_refused(
            request, f"At most {services.MAX_BULK_NODES} nodes at once: narrow the filter."
        )
    nodes, unknown = selectors.nodes_for_user(request.user, node_ids)
    releases = Release.objects.filter(state=Release.State.PUBLISHED).order_by("-created_at")
    release = releases.filter(pk=_id_or_zero(data.get("release"))).first()
    tag = (data.get("tag") or "").strip().lower()[:40]
    context: dict[str, Any] = {
        "action": action,
        "nodes": nodes,
        "unknown": unknown,
        "release": release,
        "releases": releases if action == services.BulkAction.UPDATE else [],
        "tag": tag,
    }
    if request.method == "GET":
        context["steps"] = services.bulk_steps(nodes, action, release, tag)
        context["can_start"] = any(not step.refused for step in context["steps"])
        return render(request, "updates/fleet_bulk.html", context)
    if action.tags:
        try:
            outcomes = services.bulk_tag(nodes=nodes, action=action, tag=tag, user=request.user)
        except services.TagError as refused:
            return _bulk_refused(request, str(refused).capitalize() + ".")
        context["outcomes"] = outcomes
        return render(request, "updates/fleet_bulk.html", context)
    if action == services.BulkAction.END_JOB:
        context["outcomes"] = services.bulk_end_jobs(
            nodes=nodes,
            confirmed_jobs={n.node_id: _id_or_zero(data.get(f"job-{n.node_id}")) for n in nodes},
            reason=(data.get("reason") or "").strip()[:500],
            user=request.user,
        )
        return render(request, "updates/fleet_bulk.html", context)
    points = {n.node_id: data.get(f"point-{n.node_id}", "") for n in nodes}
    context["outcomes"] = services.bulk_start(
        nodes=nodes, action=action, release=release, confirmed_points=points, user=request.user
    )
    return render(request, "updates/fleet_bulk.html", context)


@require_POST
@permission_required(START_UPDATE, raise_exception=True)
def node_tags(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    """Add tags to a node (comma or space separated) or take one off."""
    node = selectors.get_node_for_user(request.user, node_id)
    add = request.POST.get("add", "").replace(",", " ").split()
    remove = [request.POST["remove"]] if request.POST.get("remove") else []
    try:
        services.nodes_tag(nodes=[node], add=add, remove=remove, user=request.user)
    except services.TagError as refused:
        messages.error(request, str(refused).capitalize() + ".")
    return redirect("node_detail", node_id=node.node_id)


@require_POST
@permission_required(START_UPDATE, raise_exception=True)
def fleet_group_save(request: HtmxHttpRequest) -> HttpResponse:
    """Save the fleet page's current filter as a named group."""
    query = {key: request.POST.get(key, "") for key in services.GROUP_KEYS}
    try:
        group = services.node_group_save(
            name=request.POST.get("name", ""), query=query, user=request.user
        )
    except services.TagError as refused:
        messages.error(request, str(refused).capitalize() + ".")
        kept = QueryDict(mutable=True)
        kept.update({k: v for k, v in query.items() if v})
        return redirect(f"{reverse('fleet')}?{kept.urlencode()}")
    messages.success(request, f"Group {group.name!r} saved.")
    return redirect(group_url(group))


def group_url(group: NodeGroup) -> str:
    query = QueryDict(mutable=True)
    query.update({key: str(value) for key, value in group.query.items()})
    return f"{reverse('fleet')}?{query.urlencode()}"


def _bulk_refused(request: HtmxHttpRequest, reason: str) -> HttpResponse:
    return render(request, "updates/fleet_bulk.html", {"refusal": reason}, status=400)


@login_not_required
@require_GET
def fleet_poll(request: HtmxHttpRequest) -> HttpResponse:
    """What changed on the fleet page since the version it holds (`v`): nothing (204),
    else a new poll, the summary if it changed, and the page's changed tiles, or the
    whole list if the page no longer shows the same nodes in the same order."""
    if not request.user.is_authenticated:
        # The session ended while the page was open. A plain redirect would be followed
        # by htmx and the login form swapped in for the poll: send the browser there.
        return HttpResponseClientRedirect(f"{resolve_url(settings.LOGIN_URL)}?next=/")
    tenants = selectors.fleet_tenants(request.user)
    version = selectors.fleet_version(tenants)
    if request.GET.get("v") == version.token:
        return HttpResponse(status=204)
    form = FleetFilterForm(request.GET, tenants=tenants)
    page = selectors.fleet_page(tenants, form.to_filter(), request.GET.get("page"))
    summary = selectors.fleet_summary(tenants)
    since = selectors.FleetVersion.from_token(request.GET.get("v", ""))
    same_page = since is not None and request.GET.get("page_sig") == page.signature
    context = {
        "page": page,
        "query": form.as_query(page.number),
        "layout": form.chosen_layout(),
        "summary": summary,
        "version": version,
        "poll_seconds": settings.THEMIS_FLEET_POLL_SECONDS,
        "can_act": request.user.has_perm(START_UPDATE),
        "send_summary": request.GET.get("summary_sig") != summary.signature,
        "changed": (
            selectors.fleet_changed_tiles(tenants, page, since) if same_page and since else None
        ),
    }
    # No request context: nothing in the answer needs the user or a CSRF token, and the
    # context processors would cost a query on every poll.
    return HttpResponse(render_to_string("updates/fleet.html#changes", context))


@require_GET
def node_detail(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    node = selectors.get_node_for_user(request.user, node_id)
    can_update = request.user.has_perm(START_UPDATE)
    jobs = list(node.jobs.select_related("release").order_by("-created_at")[:50])
    active = next((job for job in jobs if job.state in UpdateJob.ACTIVE_STATES), None)
    busy = active is not None
    installed = plans.node_installed_versions(node)
    context = {
        "components": plans.node_components(node, installed),
        "component_problems": plans.node_component_conflicts(node, installed),
        "node": node,
        "jobs": jobs,
        "active_job": active,
        # Told by its stream of every job change; polled fast while a job runs and the
        # stream is down, so progress shows within a second either way.
        "live_part": live_part(
            active=True,
            stream_url=reverse("live_node", args=[node.node_id]),
            fast_ms=500 if busy else settings.THEMIS_FLEET_POLL_SECONDS * 1000,
            slow_seconds=settings.THEMIS_FLEET_POLL_SECONDS,
        ),
        "can_update": can_update,
        "releases": Release.objects.filter(state=Release.State.PUBLISHED) if can_update else [],
        "key_fingerprint": node_keys.key_fingerprint(node.agent_key) if can_update else "",
        "schema_history": selectors.node_schema_history(node),
        "tags": list(node.tags.all()),
        "service": selectors.service_health(
            node.service_healthy, node.error_rate, node.p99_latency_ms
        ),
    }
    return render(request, partial_template(request, "updates/node_detail.html", "live"), context)


@require_GET
def node_stream(request: HtmxHttpRequest, node_id: str) -> StreamAnswer:
    """The event stream of a node's page and its job pages: changes of the node and its
    jobs (404 for a node the user may not see, as the page itself)."""
    node = selectors.get_node_for_user(request.user, node_id)
    return stream_response((Topic.node(node.node_id),))


@require_GET
def node_job(request: HtmxHttpRequest, node_id: str, job_id: int) -> HttpResponse:
    """One job of a node: what it does and its log as it happened, refreshed while it runs."""
    node = selectors.get_node_for_user(request.user, node_id)
    job = get_object_or_404(node.jobs.select_related("release", "created_by"), pk=job_id)
    context = {
        "node": node,
        "job": job,
        "log": plans.job_log(job),
        "live_part": live_part(
            active=job.state in UpdateJob.ACTIVE_STATES,
            stream_url=reverse("live_node", args=[node.node_id]),
            fast_ms=500,
            slow_seconds=JOB_SLOW_POLL_SECONDS,
        ),
    }
    return render(request, partial_template(request, "updates/node_job.html", "log"), context)


@require_http_methods(["GET", "POST"])
@permission_required(START_UPDATE, raise_exception=True)
def node_update(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    """GET shows the update plan to the chosen release (every component it takes along, in
    order) or why there is none; POST starts the job."""
    node = selectors.get_node_for_user(request.user, node_id)
    data = request.POST if request.method == "POST" else request.GET
    release = get_object_or_404(Release, pk=_id_or_zero(data.get("release")))
    context: dict[str, Any] = {"node": node, "release": release}
    if request.method == "GET":
        context["preview"] = plans.job_plan_preview(node=node, release=release)
        return render(request, "updates/node_update_confirm.html", context)
    try:
        job_start_update(node=node, release=release, user=request.user)
    except PlanRefused as refused:
        preview = plans.PlanPreview(plan=None, explanation=refused.explanation)
        context.update(preview=preview, error=str(refused))
        return render(request, "updates/node_update_confirm.html", context, status=409)
    except JobConflict as conflict:
        messages.error(request, str(conflict))
    else:
        messages.success(request, f"Update of {node.node_id} to {release.version} queued.")
    return redirect("node_detail", node_id=node.node_id)


@require_http_methods(["GET", "POST"])
@permission_required(START_UPDATE, raise_exception=True)
def node_rollback(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    """GET asks for confirmation; POST starts the rollback job."""
    node = selectors.get_node_for_user(request.user, node_id)
    point_id = request.POST.get("point") or request.GET.get("point") or ""
    point = node.restore_point(point_id)
    if point is None:
        raise Http404("no such restore point on this node")
    if request.method == "POST":
        try:
            job_start_rollback(node=node, point_id=point_id, user=request.user)
        except JobConflict as conflict:
            context = {"node": node, "point": point, "error": str(conflict)}
            return render(request, "updates/rollback_confirm.html", context, status=409)
        messages.success(request, f"Rollback of {node.node_id} to {point_id} queued.")
        return redirect("node_detail", node_id=node.node_id)
    context = {"node": node, "point": point}
    if not point.get("version"):
        # Offered nowhere; a hand-made URL gets the reason and no button.
        context["error"] = (
            "This point was taken before anything was installed: rolling back to it would"
            " leave the node without ThemisDB."
        )
        context["refused"] = True
    return render(request, "updates/rollback_confirm.html", context)


@require_http_methods(["POST"])
def node_end_job(request: HtmxHttpRequest, node_id: str, job_id: int) -> HttpResponse:
    """End a stuck job LOST (its node is free again, its rollout applies its failure
    policy); the audit log records who and why."""
    # Scoped first: a node the user may not see is a 404, whatever their permissions.
    node = selectors.get_node_for_user(request.user, node_id)
    if not request.user.has_perm(START_UPDATE):
        raise PermissionDenied
    job = get_object_or_404(node.jobs.all(), pk=job_id)
    reason = (request.POST.get("reason") or "").strip()[:500]
    if job_end_by_operator(job=job, user=request.user, reason=reason):
        messages.success(request, f"Job {job.pk} on {node.node_id} ended as lost.")
    else:
        messages.error(request, f"Job {job.pk} had already ended.")
    return redirect("node_detail", node_id=node.node_id)


@require_http_methods(["POST"])
def node_cancel_job(request: HtmxHttpRequest, node_id: str, job_id: int) -> HttpResponse:
    """Cancel a job the agent has not started: at once if its command never left, else
    once the agent confirms it had not started it (it goes on if it had)."""
    node = selectors.get_node_for_user(request.user, node_id)
    if not request.user.has_perm(START_UPDATE):
        raise PermissionDenied
    job = get_object_or_404(node.jobs.all(), pk=job_id)
    state = job_cancel(job=job, user=request.user)
    if state is None:
        messages.error(request, f"Job {job.pk} can no longer be cancelled: it has started.")
    elif state == UpdateJob.State.CANCELLING:
        messages.success(request, f"Job {job.pk}: {node.node_id}'s agent is asked to cancel it.")
    else:
        messages.success(request, f"Job {job.pk} on {node.node_id} cancelled.")
    return redirect("node_detail", node_id=node.node_id)


@require_http_methods(["POST"])
def node_key_rotate(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    """A new key for this node's agent (also lifts a revocation); audited with who."""
    node = selectors.get_node_for_user(request.user, node_id)
    if not request.user.has_perm(START_UPDATE):
        raise PermissionDenied
    fingerprint = node_keys.node_key_rotate(node=node, user=request.user)
    messages.success(
        request,
        f"New key for {node.node_id} (fingerprint {fingerprint}): give it to the agent with"
        f" `manage.py node_key {node.node_id}`.",
    )
    return redirect("node_detail", node_id=node.node_id)


@require_http_methods(["POST"])
def node_key_revoke(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    """Revoke this node's key: nothing is signed for it, its reports are refused."""
    node = selectors.get_node_for_user(request.user, node_id)
    if not request.user.has_perm(START_UPDATE):
        raise PermissionDenied
    if node_keys.node_key_revoke(node=node, user=request.user):
        messages.success(request, f"Key of {node.node_id} revoked.")
    else:
        messages.error(request, f"The key of {node.node_id} was revoked already.")
    return redirect("node_detail", node_id=node.node_id)


def _id_or_zero(value: str | None) -> int:
    """A primary key from a form field; anything else is 0, which matches no row (a 404)."""
    text = (value or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


@require_http_methods(["GET", "POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def trust_store_page(request: HtmxHttpRequest) -> HttpResponse:
    """The fleet's trust: the stores published, which nodes have the newest; POST publishes
    a newer signed store (checked as a node would check it) and offers it to every node."""
    status = 200
    if request.method == "POST":
        upload = request.FILES.get("store")
        if upload is None or upload.size is None or upload.size > MAX_ENVELOPE_BYTES:
            messages.error(request, "Choose a trust store file (at most 1 MiB).")
            status = 400
        else:
            try:
                published = trust_stores.trust_store_publish(
                    envelope=upload.read(), user=request.user
                )
            except trust_stores.TrustStoreRefused as refused:
                messages.error(request, f"Refused: {refused}")
                status = 400
            else:
                messages.success(
                    request, f"Trust store version {published.version} published to the fleet."
                )
                return redirect("trust_store")
    context = {
        "coverage": trust_stores.trust_store_coverage(request.user),
        "versions": TrustStoreVersion.objects.select_related("created_by")[:20],
    }
    return render(request, "updates/trust_store.html", context, status=status)

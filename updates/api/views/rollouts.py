"""Rollouts: list, preview, create (and start), status with per-node progress, and the
operator actions, through the same form, selectors and services as the rollout pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.models import Tenant

# The permissions the pages require for the same actions (one place names them).
from tenants.roles import APPROVE_ROLLOUT, START_UPDATE
from updates.api.models import Scope
from updates.api.serializers import (
    ErrorSerializer,
    PlanSerializer,
    RolloutCreateSerializer,
    RolloutRequestSerializer,
    RolloutSerializer,
    RolloutStatusSerializer,
    paginated,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView, choice_param
from updates.api.views.releases import ERRORS, Pages
from updates.models import Rollout
from updates.rollouts import selectors
from updates.rollouts import services as rollouts
from updates.rollouts.forms import RolloutForm
from updates.rollouts.plan import Plan, PlanError

OPERATE = Rule(Scope.DEPLOY, START_UPDATE)
# Pause, resume and abort need what the pages need (approve_rollout) and a deploy token.
STEER = Rule(Scope.DEPLOY, APPROVE_ROLLOUT)
APPROVE = Rule(Scope.APPROVE, APPROVE_ROLLOUT)
CONFLICT = {409: ErrorSerializer, **ERRORS}


def _form_data(data: dict[str, Any], tenants: QuerySet[Tenant]) -> dict[str, Any]:
    """The API's JSON as the new-rollout form's fields. A field the request leaves out takes
    the value the page starts with; a false boolean is left out, as an unticked box is."""
    form: dict[str, Any] = {}
    for name, field in RolloutForm.base_fields.items():
        initial = field.initial() if callable(field.initial) else field.initial
        if initial is not None:
            form[name] = initial
    for name, value in data.items():
        if name in ("start", "tenant", "stages"):
            continue
        form[name] = "" if value is None else value
    if data.get("stages") is not None:
        form["stages"] = ", ".join(f"{v:g}" for v in data["stages"])
    if data.get("tenant"):
        tenant = tenants.filter(slug=data["tenant"]).first()
        # A tenant this user cannot see is no choice at all (the form says so).
        form["tenant"] = tenant.pk if tenant else -1
    else:
        form["tenant"] = ""
    return {k: v for k, v in form.items() if v is not False}


def _valid_form(request: Request, serializer: RolloutRequestSerializer) -> RolloutForm:
    serializer.is_valid(raise_exception=True)
    data = _form_data(dict(serializer.validated_data), Tenant.objects.visible_to(request.user))
    form = RolloutForm(data, user=request.user)
    if not form.is_valid():
        fields = {
            ("non_field_errors" if k == "__all__" else k): [str(m) for m in v]
            for k, v in form.errors.items()
        }
        raise ApiError(
            400,
            "invalid",
            "; ".join(f"{k}: {m}" for k, msgs in fields.items() for m in msgs),
            fields,
        )
    return form


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "stage_sizes": plan.stage_sizes,
        "nodes": [
            {
                "node": p.node.node_id,
                "position": p.position,
                "stage": p.stage,
                "is_leader": p.node.is_leader,
            }
            for p in plan.nodes
        ],
        "skipped": [{"node": n.node_id, "reason": reason} for n, reason in plan.skipped],
    }


def _plan_error(err: PlanError) -> ApiError:
    return ApiError(400, "plan_invalid", str(err), {"non_field_errors": [str(err)]})


class RolloutList(ApiView):
    rules = {"GET": READ, "POST": OPERATE}
    actions = {"POST": "rollout.create"}

    @extend_schema(
        operation_id="rollouts_list",
        parameters=[
            OpenApiParameter("state", str, enum=Rollout.State.values),
            OpenApiParameter("page", int),
            OpenApiParameter("page_size", int),
        ],
        responses={200: paginated(RolloutSerializer), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        items = selectors.rollouts_for_user(request.user)
        state = choice_param(request, "state", Rollout.State.values)
        if state:
            items = items.filter(state=state)
        pages = Pages()
        page = pages.paginate_queryset(items.order_by("-created_at", "-id"), request, view=self)
        return pages.get_paginated_response(RolloutSerializer(page, many=True).data)

    @extend_schema(
        operation_id="rollouts_create",
        request=RolloutCreateSerializer,
        responses={201: RolloutSerializer, **ERRORS},
        description="Create a rollout exactly as previewed and (unless start is false) start "
        "it. Honours Idempotency-Key: a retry starts no second rollout.",
    )
    def post(self, request: Request) -> Response:
        return self.idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        serializer = RolloutCreateSerializer(data=request.data)
        form = _valid_form(request, serializer)
        user = self.user
        try:
            rollout = rollouts.rollout_create(
                release=form.cleaned_data["release"],
                strategy=form.cleaned_data["strategy"],
                nodes=form.target_nodes(),
                user=user,
                target=form.target_description(),
                options=form.options(),
            )
            if serializer.validated_data["start"]:
                rollouts.rollout_start(rollout=rollout, user=user)
        except PlanError as err:
            raise _plan_error(err) from None
        self.audit_tenant = rollout.tenant_id
        return Response(RolloutSerializer(rollout).data, status=201)


class RolloutPreview(ApiView):
    rules = {"POST": OPERATE}
    actions = {"POST": "rollout.preview"}

    @extend_schema(
        operation_id="rollouts_preview",
        request=RolloutRequestSerializer,
        responses={200: PlanSerializer, **ERRORS},
        description="The plan as it would run: which node goes in which stage. Saves nothing.",
    )
    def post(self, request: Request) -> Response:
        form = _valid_form(request, RolloutRequestSerializer(data=request.data))
        try:
            plan = rollouts.rollout_preview(
                release=form.cleaned_data["release"],
                strategy=form.cleaned_data["strategy"],
                nodes=form.target_nodes(),
                options=form.options(),
            )
        except PlanError as err:
            raise _plan_error(err) from None
        return Response(_plan_json(plan))


def _status(request: Request, rollout: Rollout) -> dict[str, Any]:
    page = selectors.rollout_page_for_user(request.user, rollout)
    decisions = list(rollout.decisions.order_by("created_at")) if page.sees_everything else []
    return RolloutStatusSerializer(
        {
            "rollout": rollout,
            "progress": page.progress,
            "nodes": page.rows,
            "hidden_counts": page.hidden_counts,
            "decisions": decisions,
        }
    ).data


class RolloutDetail(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="rollouts_status",
        responses={200: RolloutStatusSerializer, **ERRORS},
        description="The rollout, its progress and each node's state and job, as its page "
        "shows them to this user.",
    )
    def get(self, request: Request, rollout_id: int) -> Response:
        rollout = selectors.get_rollout_for_user(request.user, rollout_id)
        return Response(_status(request, rollout))


def _action(
    service: Callable[..., Any], rule: Rule, action: str, description: str
) -> type[ApiView]:
    class RolloutAction(ApiView):
        rules = {"POST": rule}
        actions = {"POST": f"rollout.{action}"}

        @extend_schema(
            operation_id=f"rollouts_{action}",
            request=None,
            responses={200: RolloutStatusSerializer, **CONFLICT},
            description=description,
        )
        def post(self, request: Request, rollout_id: int) -> Response:
            rollout = selectors.get_rollout_for_user(request.user, rollout_id)
            self.audit_tenant = rollout.tenant_id
            try:
                service(rollout=rollout, user=self.user)
            except rollouts.RolloutError as err:
                raise ApiError(409, "rollout_state", str(err)) from None
            rollout.refresh_from_db()
            return Response(_status(request, rollout))

    RolloutAction.__name__ = RolloutAction.__qualname__ = f"Rollout{action.title()}"
    return RolloutAction


RolloutStart = _action(rollouts.rollout_start, OPERATE, "start", "Start a PLANNED rollout.")
RolloutApprove = _action(
    rollouts.rollout_approve,
    APPROVE,
    "approve",
    "Promote a canary awaiting approval to its next stage (the health gate is asked again).",
)
RolloutPause = _action(rollouts.rollout_pause, STEER, "pause", "Pause: no node starts.")
RolloutResume = _action(rollouts.rollout_resume, STEER, "resume", "Resume a paused rollout.")
RolloutAbort = _action(
    rollouts.rollout_abort, STEER, "abort", "Stop and roll back every node it touched."
)
RolloutCancel = _action(
    rollouts.rollout_cancel, OPERATE, "cancel", "Stop starting nodes; those in flight finish."
)
RolloutRetry = _action(
    rollouts.rollout_retry_failed, OPERATE, "retry", "Retry the failed nodes of a finished rollout."
)

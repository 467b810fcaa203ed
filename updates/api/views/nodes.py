"""Nodes: list with filters, detail, update, rollback, end a stuck job, cancel a job. The
node is fetched as the node page fetches it: another tenant's node is a 404."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

# The permissions the pages require for the same actions (one place names them).
from tenants.roles import START_UPDATE
from updates.api import selectors as api_selectors
from updates.api.models import Scope
from updates.api.serializers import (
    EndJobSerializer,
    ErrorSerializer,
    JobSerializer,
    NodeDetailSerializer,
    NodeRollbackSerializer,
    NodeSerializer,
    NodeUpdateSerializer,
    paginated,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView, choice_param
from updates.api.views.releases import ERRORS, Pages
from updates.fleet import selectors
from updates.jobs import services as jobs
from updates.models import Node, Release, UpdateJob

OPERATE = Rule(Scope.DEPLOY, START_UPDATE)
CONFLICT = {409: ErrorSerializer, **ERRORS}


class NodeList(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="nodes_list",
        parameters=[
            OpenApiParameter("tenant", str, description="tenant slug"),
            OpenApiParameter("cluster", str, description="cluster name or id"),
            OpenApiParameter("status", str, enum=Node.Status.values),
            OpenApiParameter("version", str, description="installed version"),
            OpenApiParameter("search", str, description="in node id and host name"),
            OpenApiParameter("page", int),
            OpenApiParameter("page_size", int),
        ],
        responses={200: paginated(NodeSerializer), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        flt = api_selectors.NodeFilter(
            **{
                name: str(params.get(name, ""))[:200]
                for name in ("tenant", "cluster", "status", "version", "search")
            }
        )
        choice_param(request, "status", Node.Status.values)
        pages = Pages()
        page = pages.paginate_queryset(
            api_selectors.nodes_for_user(request.user, flt), request, view=self
        )
        return pages.get_paginated_response(NodeSerializer(page, many=True).data)


class NodeDetail(ApiView):
    rules = {"GET": READ}

    @extend_schema(operation_id="nodes_retrieve", responses={200: NodeDetailSerializer, **ERRORS})
    def get(self, request: Request, node_id: str) -> Response:
        node = selectors.get_node_for_user(request.user, node_id)
        return Response(NodeDetailSerializer(node).data)


class NodeUpdate(ApiView):
    rules = {"POST": OPERATE}
    actions = {"POST": "node.update"}

    @extend_schema(
        operation_id="nodes_update",
        request=NodeUpdateSerializer,
        responses={201: JobSerializer, **CONFLICT},
        description="Update one node to a published release. Honours Idempotency-Key.",
    )
    def post(self, request: Request, node_id: str) -> Response:
        node = selectors.get_node_for_user(request.user, node_id)
        self.audit_tenant = node.tenant_id
        return self.idempotent(request, lambda: self._update(request, node))

    def _update(self, request: Request, node: Node) -> Response:
        data = NodeUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        release = get_object_or_404(Release, pk=data.validated_data["release"])
        try:
            job = jobs.job_start_update(node=node, release=release, user=self.user)
        except jobs.JobConflict as conflict:
            raise ApiError(409, "job_conflict", str(conflict)) from None
        return Response(JobSerializer(job).data, status=201)


class NodeRollback(ApiView):
    rules = {"POST": OPERATE}
    actions = {"POST": "node.rollback"}

    @extend_schema(
        operation_id="nodes_rollback",
        request=NodeRollbackSerializer,
        responses={201: JobSerializer, **CONFLICT},
        description="Roll a node back to one of its restore points. Honours Idempotency-Key.",
    )
    def post(self, request: Request, node_id: str) -> Response:
        node = selectors.get_node_for_user(request.user, node_id)
        self.audit_tenant = node.tenant_id
        return self.idempotent(request, lambda: self._rollback(request, node))

    def _rollback(self, request: Request, node: Node) -> Response:
        data = NodeRollbackSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        point_id = data.validated_data["point"]
        if node.restore_point(point_id) is None:
            raise ApiError(
                404,
                "not_found",
                "no such restore point on this node",
                {"point": ["no such restore point on this node"]},
            )
        try:
            job = jobs.job_start_rollback(node=node, point_id=point_id, user=self.user)
        except jobs.JobConflict as conflict:
            raise ApiError(409, "job_conflict", str(conflict)) from None
        return Response(JobSerializer(job).data, status=201)


def _job(request: Request, node_id: str, job_id: int) -> tuple[Node, UpdateJob]:
    node = selectors.get_node_for_user(request.user, node_id)
    return node, get_object_or_404(node.jobs.select_related("release", "node"), pk=job_id)


class JobEnd(ApiView):
    rules = {"POST": OPERATE}
    actions = {"POST": "job.end"}

    @extend_schema(
        operation_id="nodes_jobs_end",
        request=EndJobSerializer,
        responses={200: JobSerializer, **CONFLICT},
        description="End a stuck job LOST: its node is free again; the reason is audited.",
    )
    def post(self, request: Request, node_id: str, job_id: int) -> Response:
        node, job = _job(request, node_id, job_id)
        self.audit_tenant = node.tenant_id
        data = EndJobSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        reason = data.validated_data["reason"].strip()[:500]
        if not jobs.job_end_by_operator(job=job, user=self.user, reason=reason):
            raise ApiError(409, "job_finished", f"job {job.pk} had already ended")
        job.refresh_from_db()
        return Response(JobSerializer(job).data)


class JobCancel(ApiView):
    rules = {"POST": OPERATE}
    actions = {"POST": "job.cancel"}

    @extend_schema(
        operation_id="nodes_jobs_cancel",
        request=None,
        responses={200: JobSerializer, **CONFLICT},
        description="Cancel a job its agent has not started (CANCELLED, or CANCELLING until "
        "the agent confirms).",
    )
    def post(self, request: Request, node_id: str, job_id: int) -> Response:
        node, job = _job(request, node_id, job_id)
        self.audit_tenant = node.tenant_id
        if jobs.job_cancel(job=job, user=self.user) is None:
            raise ApiError(409, "job_started", f"job {job.pk} can no longer be cancelled")
        job.refresh_from_db()
        return Response(JobSerializer(job).data)

"""Releases: list, upload (verified by the same service as the upload form), deprecate,
delete."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

# The permissions the pages require for the same actions (one place names them).
from tenants.roles import PUBLISH_RELEASE
from updates.api.models import Scope
from updates.api.serializers import (
    ErrorSerializer,
    ReleaseSerializer,
    ReleaseUploadSerializer,
    paginated,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView, choice_param, strict_page_size
from updates.models import Release
from updates.releases import selectors, services
from updates.releases.forms import ReleaseUploadForm

DEPLOY_RELEASE = Rule(Scope.DEPLOY, PUBLISH_RELEASE)
# Every operation may answer these (429: over the token's rate).
ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 405, 429)}


class Pages(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request: Request) -> int:
        return strict_page_size(request, self.page_size, self.max_page_size)


class ReleaseList(ApiView):
    rules = {"GET": READ, "POST": DEPLOY_RELEASE}
    actions = {"POST": "release.upload"}
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="releases_list",
        parameters=[
            OpenApiParameter("state", str, enum=Release.State.values),
            OpenApiParameter("version", str),
            OpenApiParameter("page", int),
            OpenApiParameter("page_size", int),
        ],
        responses={200: paginated(ReleaseSerializer), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        releases = selectors.releases_for_user(request.user)
        state = choice_param(request, "state", Release.State.values)
        if state:
            releases = releases.filter(state=state)
        version = request.query_params.get("version")
        if version:
            releases = releases.filter(version=version)
        pages = Pages()
        page = pages.paginate_queryset(releases, request, view=self)
        return pages.get_paginated_response(ReleaseSerializer(page, many=True).data)

    @extend_schema(
        operation_id="releases_upload",
        request={"multipart/form-data": ReleaseUploadSerializer},
        responses={201: ReleaseSerializer, 409: ErrorSerializer, 422: ErrorSerializer, **ERRORS},
        description="Upload a signed bundle: verified like the upload page's, then published. "
        "Honours Idempotency-Key.",
    )
    def post(self, request: Request) -> Response:
        return self.idempotent(request, lambda: self._upload(request))

    def _upload(self, request: Request) -> Response:
        data = request.POST.copy()
        # The page's form always sends a channel; the API's default is the form's initial one.
        data.setdefault("channel", str(ReleaseUploadForm.base_fields["channel"].initial))
        form = ReleaseUploadForm(data, request.FILES)
        if not form.is_valid():
            raise ApiError(
                400,
                "invalid",
                "; ".join(f"{k}: {m}" for k, msgs in form.errors.items() for m in msgs),
                {k: [str(m) for m in v] for k, v in form.errors.items()},
            )
        try:
            release = services.release_publish(
                upload=form.cleaned_data["bundle"],
                user=self.user,
                channel=form.cleaned_data["channel"],
            )
        except services.ReleaseRejected as rejected:
            return Response(
                {
                    "code": "release_rejected",
                    "message": f"Rejected ({rejected.code}): {rejected.message}",
                    "fields": {"bundle": [f"{rejected.code}: {rejected.message}"]},
                },
                status=409 if rejected.code == "ALREADY_PUBLISHED" else 400,
            )
        return Response(ReleaseSerializer(release).data, status=201)


def _release(request: Request, release_id: int) -> Release:
    return get_object_or_404(selectors.releases_for_user(request.user), pk=release_id)


class ReleaseDetail(ApiView):
    rules = {"GET": READ, "DELETE": DEPLOY_RELEASE}
    actions = {"DELETE": "release.delete"}

    @extend_schema(operation_id="releases_retrieve", responses={200: ReleaseSerializer, **ERRORS})
    def get(self, request: Request, release_id: int) -> Response:
        return Response(ReleaseSerializer(_release(request, release_id)).data)

    @extend_schema(
        operation_id="releases_delete",
        responses={204: None, 409: ErrorSerializer, **ERRORS},
        description="Delete a release and its files; refused while rollouts or jobs use it.",
    )
    def delete(self, request: Request, release_id: int) -> Response:
        release = _release(request, release_id)
        try:
            services.release_delete(release=release, user=self.user)
        except services.ReleaseInUse as in_use:
            raise ApiError(409, "release_in_use", str(in_use)) from None
        return Response(status=204)


class ReleaseDeprecate(ApiView):
    rules = {"POST": DEPLOY_RELEASE}
    actions = {"POST": "release.deprecate"}

    @extend_schema(
        operation_id="releases_deprecate",
        request=None,
        responses={200: ReleaseSerializer, **ERRORS},
        description="No new rollouts or updates of this release; idempotent.",
    )
    def post(self, request: Request, release_id: int) -> Response:
        release = _release(request, release_id)
        services.release_deprecate(release=release, user=self.user)
        release.refresh_from_db()
        return Response(ReleaseSerializer(release).data)

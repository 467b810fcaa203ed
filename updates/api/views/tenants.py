"""Tenants: what the tenant pages show (windows, blackouts, policy, consent decisions), and
what they change (consent, policy, windows, blackouts, and the tenant list page's fleet-wide
blackouts), through the tenant pages' selectors, forms and services."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants import selectors, services
from tenants.forms import BlackoutForm, ConsentForm, PolicyForm, WindowForm
from tenants.models import Blackout, Tenant
from tenants.roles import MANAGE_ALL_TENANTS
from updates.api import selectors as api_selectors
from updates.api.models import Scope
from updates.api.serializers import (
    BlackoutRequestSerializer,
    BlackoutSerializer,
    ConsentDecisionSerializer,
    ConsentSerializer,
    ErrorSerializer,
    PolicyRequestSerializer,
    PolicySerializer,
    TenantDetailSerializer,
    TenantSerializer,
    WindowRequestSerializer,
    WindowSerializer,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView, form_valid, refused
from updates.api.views.releases import ERRORS

# Who may decide is the tenant pages' rule (tenant admins for their tenants, operators for
# all): `get_tenant_for_editor` and the services check it.
ADMIN = Rule(Scope.ADMIN)


def _detail(request: Request, tenant: Tenant) -> dict[str, Any]:
    return TenantDetailSerializer(
        {
            "tenant": tenant,
            "can_edit": selectors.can_edit_tenant(request.user, tenant),
            "policy": selectors.policy_for(tenant),
            "windows": tenant.windows.order_by("days", "start_time"),
            "blackouts": selectors.tenant_blackouts(tenant),
            "pending_consents": selectors.pending_consents(tenant),
            "consents": tenant.consents.select_related("release", "decided_by").order_by(
                "-decided_at"
            )[:100],
        }
    ).data


class TenantList(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="tenants_list", responses={200: TenantSerializer(many=True), **ERRORS}
    )
    def get(self, request: Request) -> Response:
        tenants = Tenant.objects.visible_to(request.user).order_by("name")
        return Response(TenantSerializer(tenants, many=True).data)


class TenantDetail(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="tenants_retrieve", responses={200: TenantDetailSerializer, **ERRORS}
    )
    def get(self, request: Request, slug: str) -> Response:
        return Response(_detail(request, selectors.get_tenant_for_user(request.user, slug)))


class TenantConsent(ApiView):
    rules = {"POST": ADMIN}
    actions = {"POST": "tenant.consent"}

    @extend_schema(
        operation_id="tenants_consent",
        request=ConsentDecisionSerializer,
        responses={200: ConsentSerializer, **ERRORS},
        description="Grant or decline a release for this tenant (a decline needs a reason and "
        "cancels the tenant's jobs waiting for that consent).",
    )
    def post(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        data = ConsentDecisionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = form_valid(
            ConsentForm({k: v for k, v in data.validated_data.items() if v is not None})
        ).cleaned_data
        try:
            if values["decision"] == "grant":
                consent = services.consent_grant(
                    tenant=tenant,
                    release=values["release"],
                    user=self.user,
                    valid_days=values["valid_days"],
                    note=values["reason"],
                )
            else:
                consent = services.consent_decline(
                    tenant=tenant,
                    release=values["release"],
                    user=self.user,
                    reason=values["reason"],
                )
        except ValidationError as error:
            raise refused(error) from None
        return Response(ConsentSerializer(consent).data)


class TenantPolicy(ApiView):
    rules = {"PUT": ADMIN}
    actions = {"PUT": "tenant.policy"}

    @extend_schema(
        operation_id="tenants_policy_update",
        request=PolicyRequestSerializer,
        responses={200: PolicySerializer, **ERRORS},
        description="Set the tenant's update policy; a field left out keeps its value.",
    )
    def put(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        data = PolicyRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        current = PolicySerializer(selectors.policy_for(tenant)).data
        merged = {**current, **data.validated_data}
        form = form_valid(PolicyForm({k: v for k, v in merged.items() if v is not False}))
        try:
            policy = services.update_policy_set(tenant=tenant, user=self.user, **form.cleaned_data)
        except ValidationError as error:
            raise refused(error) from None
        return Response(PolicySerializer(policy).data)


def _window_form(request: Request) -> WindowForm:
    """The request as the tenant page's window form, which checks it."""
    data = WindowRequestSerializer(data=request.data)
    data.is_valid(raise_exception=True)
    values = data.validated_data
    return form_valid(
        WindowForm(
            {
                "days": [str(d) for d in values["days"]],
                "start_time": values["start_time"].strftime("%H:%M:%S"),
                "end_time": values["end_time"].strftime("%H:%M:%S"),
                "timezone": values["timezone"],
                "label": values["label"],
            }
        )
    )


class TenantWindows(ApiView):
    rules = {"GET": READ, "POST": ADMIN}
    actions = {"POST": "tenant.window_create"}

    @extend_schema(
        operation_id="tenants_windows_list", responses={200: WindowSerializer(many=True), **ERRORS}
    )
    def get(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_user(request.user, slug)
        windows = tenant.windows.order_by("days", "start_time", "id")
        return Response(WindowSerializer(windows, many=True).data)

    @extend_schema(
        operation_id="tenants_windows_create",
        request=WindowRequestSerializer,
        responses={201: WindowSerializer, 422: ErrorSerializer, **ERRORS},
        description="Add a maintenance window (refused when it overlaps another). Honours "
        "Idempotency-Key.",
    )
    def post(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        return self.idempotent(request, lambda: self._create(request, tenant))

    def _create(self, request: Request, tenant: Tenant) -> Response:
        form = _window_form(request)
        try:
            window = services.maintenance_window_create(
                tenant=tenant, user=self.user, data=form.to_input()
            )
        except ValidationError as error:
            raise refused(error) from None
        return Response(WindowSerializer(window).data, status=201)


class TenantWindow(ApiView):
    rules = {"PUT": ADMIN, "DELETE": ADMIN}
    actions = {"PUT": "tenant.window_update", "DELETE": "tenant.window_delete"}

    @extend_schema(
        operation_id="tenants_windows_update",
        request=WindowRequestSerializer,
        responses={200: WindowSerializer, **ERRORS},
        description="Change a maintenance window, as its edit page does (refused when it would "
        "overlap another).",
    )
    def put(self, request: Request, slug: str, window_id: int) -> Response:
        window = selectors.get_window_for_editor(request.user, slug, window_id)
        self.audit_tenant = window.tenant_id
        form = _window_form(request)
        try:
            window = services.maintenance_window_update(
                window=window, user=self.user, data=form.to_input()
            )
        except ValidationError as error:
            raise refused(error) from None
        return Response(WindowSerializer(window).data)

    @extend_schema(operation_id="tenants_windows_delete", responses={204: None, **ERRORS})
    def delete(self, request: Request, slug: str, window_id: int) -> Response:
        window = selectors.get_window_for_editor(request.user, slug, window_id)
        self.audit_tenant = window.tenant_id
        services.maintenance_window_delete(window=window, user=self.user)
        return Response(status=204)


def _blackout_create(request: Request, user: User, tenant: Tenant | None) -> Response:
    """A blackout through the tenant page's form and service (`tenant` None: fleet-wide)."""
    data = BlackoutRequestSerializer(data=request.data)
    data.is_valid(raise_exception=True)
    values = {k: v for k, v in data.validated_data.items() if v is not False}
    form = form_valid(BlackoutForm(values))
    try:
        blackout = services.blackout_create(tenant=tenant, user=user, data=form.to_input())
    except ValidationError as error:
        raise refused(error) from None
    return Response(BlackoutSerializer(blackout).data, status=201)


class TenantBlackouts(ApiView):
    rules = {"GET": READ, "POST": ADMIN}
    actions = {"POST": "tenant.blackout_create"}

    @extend_schema(
        operation_id="tenants_blackouts_list",
        responses={200: BlackoutSerializer(many=True), **ERRORS},
        description="The blackouts that hold this tenant's updates: its own and the fleet-wide "
        "ones (`fleet_wide`), as its page lists them.",
    )
    def get(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_user(request.user, slug)
        return Response(BlackoutSerializer(selectors.tenant_blackouts(tenant), many=True).data)

    @extend_schema(
        operation_id="tenants_blackouts_create",
        request=BlackoutRequestSerializer,
        responses={201: BlackoutSerializer, 422: ErrorSerializer, **ERRORS},
        description="Add a blackout for this tenant. Honours Idempotency-Key.",
    )
    def post(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        return self.idempotent(request, lambda: _blackout_create(request, self.user, tenant))


class TenantBlackout(ApiView):
    rules = {"DELETE": ADMIN}
    actions = {"DELETE": "tenant.blackout_delete"}

    @extend_schema(operation_id="tenants_blackouts_delete", responses={204: None, **ERRORS})
    def delete(self, request: Request, slug: str, blackout_id: int) -> Response:
        tenant = selectors.get_tenant_for_user(request.user, slug)
        blackout: Blackout = selectors.get_blackout_for_editor(request.user, blackout_id)
        # Through this tenant's URL only this tenant's blackouts.
        if blackout.tenant_id != tenant.pk:
            raise ApiError(404, "not_found", "no such blackout for this tenant")
        self.audit_tenant = tenant.pk
        services.blackout_delete(blackout=blackout, user=self.user)
        return Response(status=204)


# Fleet-wide blackouts: the tenant list page's, set and removed by operators only (the page
# needs manage_all_tenants; the services check it again).
FLEET_ADMIN = Rule(Scope.ADMIN, MANAGE_ALL_TENANTS)


class FleetBlackouts(ApiView):
    rules = {"GET": READ, "POST": FLEET_ADMIN}
    actions = {"POST": "blackout.fleet_create"}

    @extend_schema(
        operation_id="blackouts_list",
        responses={200: BlackoutSerializer(many=True), **ERRORS},
        description="The fleet-wide blackouts: no tenant updates during them.",
    )
    def get(self, request: Request) -> Response:
        return Response(BlackoutSerializer(api_selectors.fleet_blackouts(), many=True).data)

    @extend_schema(
        operation_id="blackouts_create",
        request=BlackoutRequestSerializer,
        responses={201: BlackoutSerializer, 422: ErrorSerializer, **ERRORS},
        description="Add a fleet-wide blackout (operators). Honours Idempotency-Key.",
    )
    def post(self, request: Request) -> Response:
        return self.idempotent(request, lambda: _blackout_create(request, self.user, None))


class FleetBlackout(ApiView):
    rules = {"DELETE": FLEET_ADMIN}
    actions = {"DELETE": "blackout.fleet_delete"}

    @extend_schema(operation_id="blackouts_delete", responses={204: None, **ERRORS})
    def delete(self, request: Request, blackout_id: int) -> Response:
        blackout = selectors.get_blackout_for_editor(request.user, blackout_id)
        # Through this URL only fleet-wide blackouts; a tenant's goes through its tenant.
        if blackout.tenant_id is not None:
            raise ApiError(404, "not_found", "no such fleet-wide blackout")
        services.blackout_delete(blackout=blackout, user=self.user)
        return Response(status=204)

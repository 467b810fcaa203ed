"""Tenants: what the tenant pages show (windows, blackouts, policy, consent decisions), and
the consent decision itself, through the tenant pages' selectors, form and services."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants import selectors, services
from tenants.forms import BlackoutForm, ConsentForm, PolicyForm, WindowForm
from tenants.models import Blackout, Tenant
from updates.api.models import Scope
from updates.api.serializers import (
    BlackoutRequestSerializer,
    BlackoutSerializer,
    ConsentDecisionSerializer,
    ConsentSerializer,
    PolicyRequestSerializer,
    PolicySerializer,
    TenantDetailSerializer,
    TenantSerializer,
    WindowRequestSerializer,
    WindowSerializer,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView
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
        form = ConsentForm({k: v for k, v in data.validated_data.items() if v is not None})
        if not form.is_valid():
            raise _invalid({k: [str(m) for m in v] for k, v in form.errors.items()})
        values = form.cleaned_data
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
            raise _refused(error) from None
        return Response(ConsentSerializer(consent).data)


def _invalid(fields: dict[str, list[str]]) -> ApiError:
    fields = {("non_field_errors" if k == "__all__" else k): v for k, v in fields.items()}
    message = "; ".join(f"{k}: {m}" for k, msgs in fields.items() for m in msgs)
    return ApiError(400, "invalid", message, fields)


def _refused(error: ValidationError) -> ApiError:
    """A service's ValidationError, on the fields it names."""
    if hasattr(error, "error_dict"):
        return _invalid({k: [str(m) for m in v] for k, v in error.message_dict.items()})
    return _invalid({"non_field_errors": [str(m) for m in error.messages]})


def _valid(form: Any) -> Any:
    if not form.is_valid():
        raise _invalid({k: [str(m) for m in v] for k, v in form.errors.items()})
    return form


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
        form = _valid(PolicyForm({k: v for k, v in merged.items() if v is not False}))
        try:
            policy = services.update_policy_set(tenant=tenant, user=self.user, **form.cleaned_data)
        except ValidationError as error:
            raise _refused(error) from None
        return Response(PolicySerializer(policy).data)


class TenantWindows(ApiView):
    rules = {"POST": ADMIN}
    actions = {"POST": "tenant.window_create"}

    @extend_schema(
        operation_id="tenants_windows_create",
        request=WindowRequestSerializer,
        responses={201: WindowSerializer, **ERRORS},
        description="Add a maintenance window (refused when it overlaps another).",
    )
    def post(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        data = WindowRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        form = _valid(
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
        try:
            window = services.maintenance_window_create(
                tenant=tenant, user=self.user, data=form.to_input()
            )
        except ValidationError as error:
            raise _refused(error) from None
        return Response(WindowSerializer(window).data, status=201)


class TenantWindow(ApiView):
    rules = {"DELETE": ADMIN}
    actions = {"DELETE": "tenant.window_delete"}

    @extend_schema(operation_id="tenants_windows_delete", responses={204: None, **ERRORS})
    def delete(self, request: Request, slug: str, window_id: int) -> Response:
        window = selectors.get_window_for_editor(request.user, slug, window_id)
        self.audit_tenant = window.tenant_id
        services.maintenance_window_delete(window=window, user=self.user)
        return Response(status=204)


class TenantBlackouts(ApiView):
    rules = {"POST": ADMIN}
    actions = {"POST": "tenant.blackout_create"}

    @extend_schema(
        operation_id="tenants_blackouts_create",
        request=BlackoutRequestSerializer,
        responses={201: BlackoutSerializer, **ERRORS},
    )
    def post(self, request: Request, slug: str) -> Response:
        tenant = selectors.get_tenant_for_editor(request.user, slug)
        self.audit_tenant = tenant.pk
        data = BlackoutRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = {k: v for k, v in data.validated_data.items() if v is not False}
        form = _valid(BlackoutForm(values))
        try:
            blackout = services.blackout_create(tenant=tenant, user=self.user, data=form.to_input())
        except ValidationError as error:
            raise _refused(error) from None
        return Response(BlackoutSerializer(blackout).data, status=201)


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

"""Tenants: what the tenant pages show (windows, blackouts, policy, consent decisions), and
the consent decision itself, through the tenant pages' selectors, form and services."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants import selectors, services
from tenants.forms import ConsentForm
from tenants.models import Tenant
from updates.api.models import Scope
from updates.api.serializers import (
    ConsentDecisionSerializer,
    ConsentSerializer,
    TenantDetailSerializer,
    TenantSerializer,
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
            fields = (
                error.message_dict
                if hasattr(error, "error_dict")
                else {"non_field_errors": error.messages}
            )
            raise _invalid({k: [str(m) for m in v] for k, v in fields.items()}) from None
        return Response(ConsentSerializer(consent).data)


def _invalid(fields: dict[str, list[str]]) -> ApiError:
    fields = {("non_field_errors" if k == "__all__" else k): v for k, v in fields.items()}
    message = "; ".join(f"{k}: {m}" for k, msgs in fields.items() for m in msgs)
    return ApiError(400, "invalid", message, fields)

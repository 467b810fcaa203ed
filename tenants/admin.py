from django.contrib import admin

from .models import Blackout, Consent, MaintenanceWindow, Tenant, UpdatePolicy


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin[Tenant]):
    list_display = ("name", "slug", "created_at")
    prepopulated_fields = {"slug": ("name",)}
    filter_horizontal = ("admins",)


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(admin.ModelAdmin[MaintenanceWindow]):
    list_display = ("tenant", "describe", "label")
    list_filter = ("tenant",)


@admin.register(Blackout)
class BlackoutAdmin(admin.ModelAdmin[Blackout]):
    list_display = ("name", "tenant", "starts_at", "ends_at", "timezone", "yearly")
    list_filter = ("tenant", "yearly")


@admin.register(UpdatePolicy)
class UpdatePolicyAdmin(admin.ModelAdmin[UpdatePolicy]):
    list_display = ("tenant", "auto_update", "auto_apply_critical", "requires_consent")


@admin.register(Consent)
class ConsentAdmin(admin.ModelAdmin[Consent]):
    # Decisions are made on the tenant page, where they are logged as Events.
    list_display = ("tenant", "release", "decision", "decided_by", "decided_at", "expires_at")
    list_filter = ("decision", "tenant")

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

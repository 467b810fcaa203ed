from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class TenantQuerySet(models.QuerySet["Tenant"]):
    def visible_to(self, user: Any) -> TenantQuerySet:
        """Operators and responders see every tenant; a tenant admin only their own."""
        if not user.is_authenticated:
            return self.none()
        if user.has_perm("tenants.view_all_tenants"):
            return self.all()
        return self.filter(admins=user)


class Tenant(models.Model):
    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=60, unique=True)
    admins = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="administered_tenants"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        permissions = [("view_all_tenants", "Can see every tenant and its nodes")]

    def __str__(self) -> str:
        return self.name

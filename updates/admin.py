from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from updates.models import Cluster, Event, Node, Release, UpdateJob


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin[Cluster]):
    list_display = ("name", "tenant")
    list_filter = ("tenant",)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin[Node]):
    list_display = ("node_id", "tenant", "cluster", "installed_version", "raft_role", "status")
    list_filter = ("status", "tenant", "cluster")
    search_fields = ("node_id", "hostname")


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin[Release]):
    list_display = ("product", "version", "channel", "state", "size", "created_at")
    list_filter = ("state", "channel")
    readonly_fields = ("manifest", "signer_subject", "sha256", "size")


@admin.register(UpdateJob)
class UpdateJobAdmin(admin.ModelAdmin[UpdateJob]):
    list_display = ("node", "release", "state", "progress_percent", "created_at")
    list_filter = ("state",)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin[Event]):
    """Read-only: the audit log has no change or delete path, here or anywhere."""

    list_display = ("created_at", "actor_label", "tenant", "verb", "object_type", "object_id")
    list_filter = ("verb",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

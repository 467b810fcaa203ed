"""The three roles, as Django groups with permissions.

Tenant admins get no global permission: what they may see comes from
Tenant.admins, through the `visible_to` querysets.
"""

from __future__ import annotations

from typing import Any

OPERATOR = "operator"
TENANT_ADMIN = "tenant_admin"
RESPONDER = "responder"

# The permissions that decide what a user may do, named once: the pages and the API check
# these same names.
VIEW_ALL_TENANTS = "tenants.view_all_tenants"
MANAGE_ALL_TENANTS = "tenants.manage_all_tenants"
PUBLISH_RELEASE = "updates.publish_release"
START_UPDATE = "updates.start_update"
APPROVE_ROLLOUT = "updates.approve_rollout"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    OPERATOR: [
        VIEW_ALL_TENANTS,
        MANAGE_ALL_TENANTS,
        PUBLISH_RELEASE,
        START_UPDATE,
        APPROVE_ROLLOUT,
    ],
    TENANT_ADMIN: [],
    RESPONDER: [VIEW_ALL_TENANTS, APPROVE_ROLLOUT],
}


def ensure_role_groups(apps: Any = None) -> None:
    """Create or refresh the role groups. Usable from a data migration (`apps`)
    and from plain code (no `apps`)."""
    if apps is None:
        from django.apps import apps as global_apps

        apps = global_apps
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    for role, perms in ROLE_PERMISSIONS.items():
        group, _ = group_model.objects.get_or_create(name=role)
        wanted = []
        for dotted in perms:
            app_label, codename = dotted.split(".")
            # An early migration runs before later models (and their
            # permissions) exist; the migration that adds them calls this again.
            wanted.extend(
                permission_model.objects.filter(
                    content_type__app_label=app_label, codename=codename
                )
            )
        group.permissions.set(wanted)


def refresh_role_groups(apps: Any, schema_editor: Any = None) -> None:
    """For data migrations: Django creates permissions only after all
    migrations ran, so make them now, then (re)build the groups."""
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    ensure_role_groups(apps)

from django.contrib.auth.management import create_permissions
from django.db import migrations

from tenants.roles import ensure_role_groups


def refresh_role_groups(apps, schema_editor):
    # New permissions (approve_rollout) must exist before the groups get them.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    ensure_role_groups(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("updates", "0004_rollouts_artifacts"),
        ("tenants", "0002_role_groups"),
    ]

    operations = [migrations.RunPython(refresh_role_groups, migrations.RunPython.noop)]

from django.contrib.auth.management import create_permissions
from django.db import migrations

from tenants.roles import ensure_role_groups


def create_role_groups(apps, schema_editor):
    # Permissions are normally created after all migrations; make them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    ensure_role_groups(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0001_initial"),
        ("updates", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_role_groups, migrations.RunPython.noop)]

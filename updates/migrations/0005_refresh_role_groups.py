from django.db import migrations

from tenants.roles import refresh_role_groups


class Migration(migrations.Migration):
    dependencies = [
        ("updates", "0004_rollouts_artifacts"),
        ("tenants", "0002_role_groups"),
    ]

    operations = [migrations.RunPython(refresh_role_groups, migrations.RunPython.noop)]

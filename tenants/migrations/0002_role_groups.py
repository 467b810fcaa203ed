from django.db import migrations

from tenants.roles import refresh_role_groups


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0001_initial"),
        ("updates", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(refresh_role_groups, migrations.RunPython.noop)]

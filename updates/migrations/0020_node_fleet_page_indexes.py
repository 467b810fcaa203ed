from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0003_schedules_policy_consent"),
        ("updates", "0019_rollout_node_indexes"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="node",
            index=models.Index(fields=["tenant", "updated_at"], name="node_tenant_updated"),
        ),
        migrations.AddIndex(
            model_name="node",
            index=models.Index(
                fields=["tenant", "status", "installed_version"], name="node_tenant_status_version"
            ),
        ),
    ]

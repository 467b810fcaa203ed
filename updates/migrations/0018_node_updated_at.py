from django.db import migrations, models
from django.utils import timezone


class Migration(migrations.Migration):
    dependencies = [
        ("updates", "0017_event_page_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="updated_at",
            field=models.DateTimeField(auto_now=True, db_index=True, default=timezone.now),
            preserve_default=False,
        ),
    ]

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "updates.notifications"
    label = "notifications"
    verbose_name = "Notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the settings checks

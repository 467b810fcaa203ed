from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "updates.notifications"
    label = "notifications"
    verbose_name = "Notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here because models may load only once the app registry is ready.
        from updates.audit import subscribe

        from . import checks  # noqa: F401 - registers the settings checks
        from .dispatch import notify_event

        # Slack/PagerDuty/webhooks hear of every Event, after commit; never raises or waits.
        subscribe(notify_event)

from django.apps import AppConfig


class LiveConfig(AppConfig):
    name = "updates.live"
    label = "live"
    verbose_name = "Live pages"

    def ready(self) -> None:
        # Imported here because models may load only once the app registry is ready.
        from updates.audit import subscribe

        from .services import announce_event

        # Every Event about a rollout or a job tells the pages showing it, after commit.
        subscribe(announce_event)

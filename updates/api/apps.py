from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "updates.api"
    label = "api"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "API"

    def ready(self) -> None:
        # Registers the token scheme with the schema generator (an import with an effect).
        from updates.api import schema  # noqa: F401

"""Settings shared by every dashboard process (web, coordinator, beat)."""

from __future__ import annotations

import os
from pathlib import Path

from themis_dashboard.env import (
    env_bool,
    env_int,
    env_list,
    env_path,
    env_redis_url,
    env_str,
    parse_database_url,
    sqlite_database,
)

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = env_path("THEMIS_VAR_DIR", BASE_DIR / "var")

DEFAULT_SECRET_KEY = "insecure-local-development-key-not-for-production"  # noqa: S105 - refused by production settings
SECRET_KEY = env_str("SECRET_KEY", DEFAULT_SECRET_KEY)
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "tenants",
    "updates",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "themis_dashboard.urls"
WSGI_APPLICATION = "themis_dashboard.wsgi.application"
ASGI_APPLICATION = "themis_dashboard.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "themis_dashboard.context_processors.roles",
            ],
        },
    }
]

_db_url = os.environ.get("DATABASE_URL")
DATABASES = {
    "default": parse_database_url("DATABASE_URL", _db_url)
    if _db_url is not None
    else sqlite_database(VAR_DIR / "themis.sqlite3")
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "fleet"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "themis_dashboard" / "static"]
STATIC_ROOT = VAR_DIR / "static"
MEDIA_ROOT = env_path("THEMIS_MEDIA_ROOT", VAR_DIR / "media")
MEDIA_URL = "media/"

# Trust anchor for release bundles: read at start-up, never changeable from the UI.
THEMIS_TRUST_ANCHOR = env_path("THEMIS_TRUST_ANCHOR", VAR_DIR / "pki" / "root.pem")
THEMIS_PRODUCT = env_str("THEMIS_PRODUCT", "themisdb")
THEMIS_MAX_BUNDLE_BYTES = env_int("THEMIS_MAX_BUNDLE_BYTES", 4 << 30, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 << 20
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 << 20
THEMIS_NODE_OFFLINE_AFTER = env_int("THEMIS_NODE_OFFLINE_AFTER", 30, minimum=1)
THEMIS_OFFLINE_CHECK_SECONDS = env_int("THEMIS_OFFLINE_CHECK_SECONDS", 10, minimum=1)
THEMIS_FLEET_POLL_SECONDS = env_int("THEMIS_FLEET_POLL_SECONDS", 2, minimum=1)

REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "dashboard"
# Longer than the longest job, so a slow apply is not redelivered mid-way.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4 * 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ROUTES = {"workers.tasks.*": {"queue": "dashboard"}}
CELERY_BEAT_SCHEDULE = {
    "mark-silent-nodes-offline": {
        "task": "workers.tasks.mark_offline_nodes",
        "schedule": float(THEMIS_OFFLINE_CHECK_SECONDS),
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

"""Settings shared by every dashboard process (web, coordinator, beat)."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from themis_dashboard.env import (
    env_bool,
    env_int,
    env_list,
    env_networks,
    env_path,
    env_redis_url,
    env_str,
    parse_database_url,
    sqlite_database,
)

# Generic classes (ModelAdmin[Model], forms.ModelChoiceField[Model]) subscriptable at run time.
django_stubs_ext.monkeypatch()

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
    "csp",
    "axes",
    "tenants",
    "updates",
    "updates.notifications",
    "updates.live",
    "updates.api",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Compresses pages and API answers once every middleware below has produced them (it
    # must sit above any that reads or writes the body). Why BREACH is no reason to leave
    # a page out: themis_dashboard/compression.py.
    "themis_dashboard.compression.PageGZipMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Below the compression (it writes a body), below authentication (the page greets).
    "themis_dashboard.errors.MethodNotAllowedPage",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes requires: it answers a locked-out login.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "themis_dashboard.urls"
CSRF_FAILURE_VIEW = "themis_dashboard.errors.csrf_failure"
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

# Login throttling: after AXES_FAILURE_LIMIT failed logins for one username from one address,
# that pair is locked out for AXES_COOLOFF_MINUTES (the login page says so, with a 429).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True

# Content-Security-Policy: everything from this origin only; no inline script or style.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
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
# Release pipeline signing (delta bundles are built and signed by the dashboard).
# The defaults are where `make run` leaves its demo PKI (updates.engine.devpki).
THEMIS_SIGNING_KEY = env_path("THEMIS_SIGNING_KEY", VAR_DIR / "pki" / "leaf.key")
THEMIS_SIGNING_CERT = env_path("THEMIS_SIGNING_CERT", VAR_DIR / "pki" / "leaf.pem")
THEMIS_SIGNING_CHAIN = env_path("THEMIS_SIGNING_CHAIN", VAR_DIR / "pki" / "chain.pem")
# The delta bundles' signing key in a PKCS#11 token instead of THEMIS_SIGNING_KEY (the key
# never leaves it): an RFC 7512 URI, and where its PIN is (file:/path or env:NAME).
THEMIS_SIGNING_PKCS11_URI = os.environ.get("THEMIS_SIGNING_PKCS11_URI", "")
THEMIS_SIGNING_PIN_SOURCE = os.environ.get("THEMIS_SIGNING_PIN_SOURCE", "")
# Delta bundles are made from this many earlier releases (0 disables them).
THEMIS_DELTA_BASES = env_int("THEMIS_DELTA_BASES", 2, minimum=0)
# Delivery by parts: a release is also stored as its manifest plus one object per file, so
# a node fetches only the files it lacks (updates/releases/parts.py).
THEMIS_RELEASE_PARTS = env_bool("THEMIS_RELEASE_PARTS", True)
THEMIS_MAX_BUNDLE_BYTES = env_int("THEMIS_MAX_BUNDLE_BYTES", 4 << 30, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 << 20
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 << 20
THEMIS_NODE_OFFLINE_AFTER = env_int("THEMIS_NODE_OFFLINE_AFTER", 30, minimum=1)
THEMIS_OFFLINE_CHECK_SECONDS = env_int("THEMIS_OFFLINE_CHECK_SECONDS", 10, minimum=1)
# Liveness is exact in Redis. A node's `last_heartbeat` row is rewritten by a batch only once
# it is this far behind (0: every batch; it rides the batch's UPDATE, and never moves the fleet
# page's change marker). More than 0 delays the canary gate, which waits for a heartbeat
# stored after each node's update, by up to this much.
THEMIS_LIVENESS_WRITE_SECONDS = env_int("THEMIS_LIVENESS_WRITE_SECONDS", 0, minimum=0)
# Heartbeats per batch an ingester takes off the list (updates.fleet.ingest).
THEMIS_HEARTBEAT_BATCH = env_int("THEMIS_HEARTBEAT_BATCH", 500, minimum=1)
# Whether every coordinator worker runs an ingester beside its tasks (0: only dedicated
# `manage.py ingest_heartbeats` processes take heartbeats).
THEMIS_HEARTBEAT_INGESTER = env_int("THEMIS_HEARTBEAT_INGESTER", 1, minimum=0) > 0
THEMIS_FLEET_POLL_SECONDS = env_int("THEMIS_FLEET_POLL_SECONDS", 2, minimum=1)
# Live pages (updates.live): an open node, job or rollout page holds an event stream that
# says when it changed, and polls fast only while the stream is down. 0 turns streams off
# (every page polls as it would without them). A stream ends after STREAM_SECONDS (the
# browser opens the next at once), says it is alive every KEEPALIVE_SECONDS, and at most
# MAX_STREAMS are open at once in one server process (each holds a thread).
THEMIS_LIVE_UPDATES = env_int("THEMIS_LIVE_UPDATES", 1, minimum=0) > 0
THEMIS_LIVE_STREAM_SECONDS = env_int("THEMIS_LIVE_STREAM_SECONDS", 55, minimum=1)
THEMIS_LIVE_KEEPALIVE_SECONDS = env_int("THEMIS_LIVE_KEEPALIVE_SECONDS", 15, minimum=1)
THEMIS_LIVE_MAX_STREAMS = env_int("THEMIS_LIVE_MAX_STREAMS", 64, minimum=1)

REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "dashboard"
# Job deadlines (defaults; each rollout may set its own). A command the agent has not
# acknowledged is re-sent every ACK_TIMEOUT seconds, MAX_SENDS times in all; an acknowledged
# job silent for PROGRESS_TIMEOUT seconds, or whose node stays offline OFFLINE_GRACE seconds,
# ends LOST so its node can take new jobs.
THEMIS_JOB_ACK_TIMEOUT = env_int("THEMIS_JOB_ACK_TIMEOUT", 30, minimum=1)
THEMIS_JOB_MAX_SENDS = env_int("THEMIS_JOB_MAX_SENDS", 5, minimum=1)
THEMIS_JOB_PROGRESS_TIMEOUT = env_int("THEMIS_JOB_PROGRESS_TIMEOUT", 600, minimum=1)
THEMIS_JOB_OFFLINE_GRACE = env_int("THEMIS_JOB_OFFLINE_GRACE", 120, minimum=0)
# The outbox relay and the deadline reaper run this often.
THEMIS_COMMAND_RELAY_SECONDS = env_int("THEMIS_COMMAND_RELAY_SECONDS", 5, minimum=1)
# The longest a job can go without a report before a deadline ends it.
THEMIS_LONGEST_JOB_DEADLINE = max(
    THEMIS_JOB_ACK_TIMEOUT * THEMIS_JOB_MAX_SENDS,
    THEMIS_JOB_PROGRESS_TIMEOUT,
    THEMIS_NODE_OFFLINE_AFTER + THEMIS_JOB_OFFLINE_GRACE,
)
# Longer than the longest job deadline (and than a slow apply): a message is redelivered
# only after its job would have ended LOST anyway, never while the outbox still re-sends it.
# Agents read THEMIS_BROKER_VISIBILITY_TIMEOUT too (settings/agent.py): set it for both, or
# neither (both then use 4 h, which the default deadlines stay well under).
THEMIS_BROKER_VISIBILITY_TIMEOUT = env_int(
    "THEMIS_BROKER_VISIBILITY_TIMEOUT", max(4 * 3600, 2 * THEMIS_LONGEST_JOB_DEADLINE), minimum=60
)
if THEMIS_BROKER_VISIBILITY_TIMEOUT < 2 * THEMIS_LONGEST_JOB_DEADLINE:
    raise ImproperlyConfigured(
        f"THEMIS_BROKER_VISIBILITY_TIMEOUT: {THEMIS_BROKER_VISIBILITY_TIMEOUT} s is shorter than "
        f"twice the longest job deadline ({THEMIS_LONGEST_JOB_DEADLINE} s)"
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": THEMIS_BROKER_VISIBILITY_TIMEOUT}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ROUTES = {
    "workers.tasks.*": {"queue": "dashboard"},
    "updates.notifications.tasks.*": {"queue": "dashboard"},
    "tenants.tasks.*": {"queue": "dashboard"},
}
THEMIS_ROLLOUT_REAPER_SECONDS = env_int("THEMIS_ROLLOUT_REAPER_SECONDS", 5, minimum=1)
CELERY_BEAT_SCHEDULE = {
    "mark-silent-nodes-offline": {
        "task": "workers.tasks.mark_offline_nodes",
        "schedule": float(THEMIS_OFFLINE_CHECK_SECONDS),
    },
    "drive-active-rollouts": {
        "task": "workers.tasks.drive_active_rollouts",
        "schedule": float(THEMIS_ROLLOUT_REAPER_SECONDS),
    },
    # Jobs held for a maintenance window or consent start when allowed.
    "release-waiting-jobs": {
        "task": "workers.tasks.release_waiting_jobs",
        "schedule": 30.0,
    },
    # The outbox: send and re-send commands to nodes until acknowledged.
    "relay-node-commands": {
        "task": "workers.tasks.relay_node_commands",
        "schedule": float(THEMIS_COMMAND_RELAY_SECONDS),
    },
    # Deadlines: jobs never acknowledged, silent, or on a vanished node end LOST.
    "reap-lost-jobs": {
        "task": "workers.tasks.reap_lost_jobs",
        "schedule": float(THEMIS_COMMAND_RELAY_SECONDS),
    },
    # Each tenant hears of its next window its policy's lead time ahead.
    "remind-windows-opening": {
        "task": "tenants.tasks.remind_windows_opening",
        "schedule": 60.0,
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

# Artifact delivery: nodes fetch bundles from THEMIS_PUBLIC_URL with a per-job
# token valid this long (from when the job is sent to the node).
THEMIS_PUBLIC_URL = env_str("THEMIS_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
if not THEMIS_PUBLIC_URL.startswith(("http://", "https://")) or "?" in THEMIS_PUBLIC_URL:
    raise ImproperlyConfigured(
        f"THEMIS_PUBLIC_URL: expected an http(s):// base URL, got {THEMIS_PUBLIC_URL!r}"
    )
THEMIS_DOWNLOAD_TOKEN_SECONDS = env_int("THEMIS_DOWNLOAD_TOKEN_SECONDS", 3600, minimum=60)
# Files of deleted releases left behind by a crash are removed this often.
THEMIS_TOMBSTONE_CLEANUP_SECONDS = env_int("THEMIS_TOMBSTONE_CLEANUP_SECONDS", 900, minimum=10)
CELERY_BEAT_SCHEDULE["cleanup-artifact-tombstones"] = {
    "task": "workers.tasks.cleanup_artifact_tombstones",
    "schedule": float(THEMIS_TOMBSTONE_CLEANUP_SECONDS),
}

# Release feeds (updates.releases.feeds): sources polled for new signed bundles. Beat looks
# for due feeds this often; each feed has its own interval (at least the minimum). Failures
# back off from BASE to MAX seconds (doubling, with jitter); a server's Retry-After or rate
# limit reset is honoured, but never makes a feed wait longer than MAX_WAIT seconds.
THEMIS_FEED_CHECK_SECONDS = env_int("THEMIS_FEED_CHECK_SECONDS", 60, minimum=5)
THEMIS_FEED_MIN_INTERVAL_SECONDS = env_int("THEMIS_FEED_MIN_INTERVAL_SECONDS", 60, minimum=1)
THEMIS_FEED_BACKOFF_BASE_SECONDS = env_int("THEMIS_FEED_BACKOFF_BASE_SECONDS", 60, minimum=1)
THEMIS_FEED_BACKOFF_MAX_SECONDS = env_int("THEMIS_FEED_BACKOFF_MAX_SECONDS", 6 * 3600, minimum=1)
THEMIS_FEED_MAX_WAIT_SECONDS = env_int("THEMIS_FEED_MAX_WAIT_SECONDS", 24 * 3600, minimum=60)
THEMIS_FEED_TIMEOUT_SECONDS = env_int("THEMIS_FEED_TIMEOUT_SECONDS", 30, minimum=1)
# The longest one poll may take, downloads included (a server dripping bytes is cut then).
THEMIS_FEED_POLL_SECONDS = env_int("THEMIS_FEED_POLL_SECONDS", 1800, minimum=10)
# Bundles one poll downloads at most; more are left for the next beat.
THEMIS_FEED_DOWNLOADS_PER_POLL = env_int("THEMIS_FEED_DOWNLOADS_PER_POLL", 3, minimum=1)
# As for notifications: https to public addresses only, unless allowed here.
THEMIS_FEED_ALLOW_HTTP = env_bool("THEMIS_FEED_ALLOW_HTTP", False)
THEMIS_FEED_EGRESS_ALLOW = env_networks("THEMIS_FEED_EGRESS_ALLOW")
CELERY_BEAT_SCHEDULE["poll-release-feeds"] = {
    "task": "workers.tasks.poll_release_feeds",
    "schedule": float(THEMIS_FEED_CHECK_SECONDS),
}

# Notifications (updates.notifications): Slack, PagerDuty, signed webhooks.
THEMIS_DASHBOARD_URL = env_str("THEMIS_DASHBOARD_URL", THEMIS_PUBLIC_URL)  # links in messages
THEMIS_PAGERDUTY_EVENTS_URL = env_str(
    "THEMIS_PAGERDUTY_EVENTS_URL", "https://events.pagerduty.com/v2/enqueue"
)
THEMIS_NOTIFY_MAX_ATTEMPTS = env_int("THEMIS_NOTIFY_MAX_ATTEMPTS", 6, minimum=1)
THEMIS_NOTIFY_BACKOFF_BASE_MS = env_int("THEMIS_NOTIFY_BACKOFF_BASE_MS", 2000, minimum=1)
THEMIS_NOTIFY_BACKOFF_MAX_MS = env_int("THEMIS_NOTIFY_BACKOFF_MAX_MS", 300_000, minimum=1)
THEMIS_NOTIFY_TIMEOUT_SECONDS = env_int("THEMIS_NOTIFY_TIMEOUT_SECONDS", 5, minimum=1)
# Node-level events of one rollout are summed up per channel over this window.
THEMIS_NOTIFY_BATCH_WINDOW_MS = env_int("THEMIS_NOTIFY_BATCH_WINDOW_MS", 10_000, minimum=0)
THEMIS_NOTIFY_LOG_DAYS = env_int("THEMIS_NOTIFY_LOG_DAYS", 30, minimum=1)
# Plain-http webhook URLs are refused unless this is on (local receivers, tests).
THEMIS_NOTIFY_ALLOW_HTTP = env_bool("THEMIS_NOTIFY_ALLOW_HTTP", False)
# Networks a notification may reach although not public (loopback, private...), comma-separated
# addresses or CIDRs: e.g. "127.0.0.1" for a local receiver. Everything else non-public is refused.
THEMIS_NOTIFY_EGRESS_ALLOW = env_networks("THEMIS_NOTIFY_EGRESS_ALLOW")
CELERY_BEAT_SCHEDULE["notifications-sweep"] = {
    "task": "updates.notifications.tasks.sweep",
    "schedule": 30.0,
}

# Retention of the audit log (updates.events.services): events older than KEEP_DAYS are written
# to gzip'd JSON-lines files in ARCHIVE_DIR, then deleted (0 keeps every event). Beat runs it
# this often; a run archives what is due and stops.
THEMIS_EVENTS_KEEP_DAYS = env_int("THEMIS_EVENTS_KEEP_DAYS", 90, minimum=0)
THEMIS_EVENTS_ARCHIVE_DIR = env_path("THEMIS_EVENTS_ARCHIVE_DIR", VAR_DIR / "events-archive")
THEMIS_EVENTS_ARCHIVE_SECONDS = env_int("THEMIS_EVENTS_ARCHIVE_SECONDS", 3600, minimum=60)
CELERY_BEAT_SCHEDULE["archive-old-events"] = {
    "task": "workers.tasks.archive_events",
    "schedule": float(THEMIS_EVENTS_ARCHIVE_SECONDS),
}

# The JSON API (/api/v1/, updates.api): API tokens first, the browser's session for the docs
# page; errors as {"code", "message"}; throttled per token at THEMIS_API_RATE ("N/s|min|hour").
THEMIS_API_RATE = env_str("THEMIS_API_RATE", "600/min")
if not re.fullmatch(r"[1-9][0-9]{0,6}/(s|sec|m|min|h|hour|d|day)", THEMIS_API_RATE):
    raise ImproperlyConfigured(
        f"THEMIS_API_RATE: expected a rate like 600/min, got {THEMIS_API_RATE!r}"
    )
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "updates.api.views.access.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["updates.api.views.access.ScopeAndRole"],
    "DEFAULT_THROTTLE_CLASSES": ["updates.api.views.access.TokenRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "updates.api.views.base.json_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Themis Update Manager API",
    "DESCRIPTION": "Releases, nodes, rollouts and the audit log of a ThemisDB fleet.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "updates.api.schema.document_unsupported_media_type",
    ],
}

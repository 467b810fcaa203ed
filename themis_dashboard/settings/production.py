"""Production: refuses to start with DEBUG on, the default secret or a public URL that is not
https; HTTPS everywhere (redirect, HSTS, secure cookies) and `manage.py check --deploy` clean.

Behind a TLS-terminating proxy, the proxy must set X-Forwarded-Proto (trusted below)."""

from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from themis_dashboard.env import env_bool, env_int

from .base import *  # noqa: F403
from .base import DEBUG, DEFAULT_SECRET_KEY, MIDDLEWARE, SECRET_KEY, THEMIS_PUBLIC_URL

if DEBUG:
    raise ImproperlyConfigured("DEBUG: must be off in production")
if SECRET_KEY == DEFAULT_SECRET_KEY or len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("SECRET_KEY: set a random secret of at least 32 characters")

# Download tokens and session cookies must never cross the network in clear.
if urlsplit(THEMIS_PUBLIC_URL).scheme != "https":
    raise ImproperlyConfigured(
        f"THEMIS_PUBLIC_URL: must be an https:// URL in production (got {THEMIS_PUBLIC_URL!r})"
    )

SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
CSRF_TRUSTED_ORIGINS = [THEMIS_PUBLIC_URL]

# gunicorn serves static files itself (collected at image build), no nginx needed.
MIDDLEWARE = [MIDDLEWARE[0], "whitenoise.middleware.WhiteNoiseMiddleware", *MIDDLEWARE[1:]]

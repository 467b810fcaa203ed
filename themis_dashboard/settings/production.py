"""Production: refuses to start with DEBUG on or the default secret."""

from django.core.exceptions import ImproperlyConfigured

from themis_dashboard.env import env_bool

from .base import *  # noqa: F403
from .base import DEBUG, DEFAULT_SECRET_KEY, MIDDLEWARE, SECRET_KEY

if DEBUG:
    raise ImproperlyConfigured("DEBUG: must be off in production")
if SECRET_KEY == DEFAULT_SECRET_KEY or len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("SECRET_KEY: set a random secret of at least 32 characters")

SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# gunicorn serves static files itself (collected at image build), no nginx needed.
MIDDLEWARE = [MIDDLEWARE[0], "whitenoise.middleware.WhiteNoiseMiddleware", *MIDDLEWARE[1:]]

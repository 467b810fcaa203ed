"""Node agent settings: broker only. No DATABASES on purpose: an agent holds
no database credentials and cannot open the dashboard's database."""

from themis_dashboard.env import env_int, env_redis_url

REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
# The same value as the dashboard's (settings/base.py): longer than any job deadline.
BROKER_VISIBILITY_TIMEOUT = env_int("THEMIS_BROKER_VISIBILITY_TIMEOUT", 4 * 3600, minimum=60)

"""Celery configuration of a node agent (lower-case Celery setting names)."""

from themis_dashboard.settings.agent import BROKER_VISIBILITY_TIMEOUT, REDIS_URL

broker_url = REDIS_URL
result_backend = None
task_ignore_result = True
task_acks_late = True
worker_prefetch_multiplier = 1
broker_connection_retry_on_startup = True
broker_transport_options = {"visibility_timeout": BROKER_VISIBILITY_TIMEOUT}
task_default_queue = "dashboard"
worker_hijack_root_logger = False

"""One Celery app, two roles.

The dashboard processes (coordinator, beat) load Django settings and the
tasks modules of `updates` and `tenants`. A node agent (THEMIS_NODE_ID set) loads only the broker
settings and `workers.agent`: it never imports Django's database layer.
"""

from __future__ import annotations

import os

from celery import Celery

AGENT_MODE = bool(os.environ.get("THEMIS_NODE_ID"))

if AGENT_MODE:
    # An agent must not pick up the dashboard's Django settings by accident.
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    app = Celery("themis_agent")
    app.config_from_object("themis_dashboard.settings.agent_celery")
    app.conf.include = ["workers.agent"]
else:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "themis_dashboard.settings.local")
    app = Celery("themis_dashboard")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    # Each domain's tasks sit beside it; their names stay "workers.tasks.*" (see TaskName).
    app.conf.include = [
        "updates.events.tasks",
        "updates.fleet.tasks",
        "updates.jobs.tasks",
        "updates.releases.tasks",
        "updates.rollouts.tasks",
        "updates.notifications.tasks",
        "tenants.tasks",
    ]

"""Local development (`make run`): DEBUG off like production, so errors show the site's
own pages (`DEBUG=1 make run` turns Django's debug pages on)."""

from themis_dashboard.env import env_bool

from .base import *  # noqa: F403

DEBUG = env_bool("DEBUG", False)

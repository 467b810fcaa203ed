"""Local development (`make run`)."""

from .base import *  # noqa: F403
from themis_dashboard.env import env_bool

DEBUG = env_bool("DEBUG", True)

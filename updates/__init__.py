"""The `updates` app: the fleet, releases, jobs and rollouts, and the audit log.

One app label (permissions, migrations and role groups depend on it) with a package per
concern; `models.py` holds every model. Layers point down (views/tasks -> services/selectors
-> models), checked by the import contracts in pyproject.toml."""

"""Rollouts: options, the plan (canary stages, rolling order, leader last), operator actions,
the coordinator that drives a rollout, the canary gate, blue/green, per-tenant rollback,
their pages, forms and charts.

May call: jobs, releases, tenants, audit, models. Nothing below imports from here."""

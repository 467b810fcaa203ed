"""Tenants: roles, maintenance windows, blackouts, update policies, consent, and the update
gate that holds a job until they allow it (`scheduler.py` is the plain-Python calendar).

May call: the `updates` models and audit log; never jobs or rollouts (they call the gate)."""

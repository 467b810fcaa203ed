"""Releases: publish (verify a signed bundle), deprecate, delete; delta bundles; storage and
tombstones; resumable artifact downloads for jobs.

May call: the engine (verification, deltas), audit, models."""

"""Update and rollback jobs: the per-node state machine (conditional transitions), sending a
job to its node's agent, and the NodeTransport seam.

May call: releases (artifact URLs and tokens), tenants' update gate, audit, models. It wakes
the rollout coordinator by task name, never by import."""

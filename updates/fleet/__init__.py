"""The fleet: nodes and what their agents report (heartbeats, job progress and results, each
verified against the node's key), liveness, the fleet and event pages.

May call: jobs (a final report repeated in a heartbeat), audit, models. Nothing calls up here
except URLs and Celery."""

"""Notifications: Slack, PagerDuty and signed JSON webhooks on audit events, with a
delivery log, retries and batching.

Subscribes to the audit log at start-up; may call audit and models, never rollouts or jobs."""

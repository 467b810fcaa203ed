"""Notifications: Slack, PagerDuty and signed JSON webhooks on update events."""

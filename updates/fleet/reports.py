"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from updates.engine.reports import ReportInvalid, envelope_node_id, verify_report
from updates.fleet import services
from updates.fleet.node_keys import node_key


def open_report(envelope: Any, legacy: dict[str, Any], task: str) -> dict[str, Any] | None:
    """The verified content of an agent's report, or None (rejected and logged).
    Unsigned reports pass only when THEMIS_REQUIRE_SIGNED_REPORTS is off."""
    if envelope is None:
        if settings.THEMIS_REQUIRE_SIGNED_REPORTS:
            services.report_reject(
                node_id=str(legacy.get("node_id", "")), task=task, reason="unsigned report"
            )
            return None
        return legacy
    node_id = envelope_node_id(envelope)
    try:
        return verify_report(node_key(node_id), envelope)
    except ReportInvalid as err:
        services.report_reject(node_id=node_id, task=task, reason=str(err))
        return None

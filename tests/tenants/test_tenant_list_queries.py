"""The tenant list works every tenant's next window out in the same few queries however
many tenants there are (it made four queries per tenant)."""

from __future__ import annotations

from datetime import time

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tenants.models import MaintenanceWindow
from tests.factories import make_tenant

pytestmark = pytest.mark.django_db


def _add_tenants(count: int, start: int) -> None:
    for i in range(start, start + count):
        tenant = make_tenant(name=f"Tenant {i}", slug=f"tenant-{i}")
        MaintenanceWindow.objects.create(
            tenant=tenant, days="56", start_time=time(2), end_time=time(4), timezone="UTC"
        )


def _queries(client: Client) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("tenant_list"))
    assert response.status_code == 200
    return len(queries), response.content.decode()


def test_the_tenant_list_costs_the_same_queries_for_3_and_30_tenants(
    personas: dict[str, Client],
) -> None:
    operator = personas["operator"]
    _add_tenants(3, 0)
    few, _ = _queries(operator)
    _add_tenants(27, 3)
    many, body = _queries(operator)
    assert few == many, (few, many)
    # Each row still says when its tenant's next window opens.
    assert body.count('data-tenant="tenant-') >= 30
    assert body.count("UTC (in ") + body.count("open now") >= 30

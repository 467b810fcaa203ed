"""A job's post-update checks travel in the agent's final report and show on the node
page; a failed verification leaves the job ROLLED_BACK."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import UpdateJob

pytestmark = pytest.mark.django_db

CHECKS = [
    {"name": "serves", "kind": "integration", "ok": True, "detail": "GET /version answered 200"},
    {"name": "p99", "kind": "performance", "ok": False, "detail": "p99 95.5 ms is over 3x"},
]


def test_failed_verification_rolls_the_job_back_and_shows_every_check(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=NullTransport()
    )
    jobs.job_finish(
        job_id=job.pk,
        node_id="a-1",
        ok=False,
        error_code="VERIFICATION_FAILED_ROLLED_BACK",
        error_message="verification failed: p99 (p99 95.5 ms is over 3x); rolled back to 1.0.0",
        result={"verification": CHECKS},
    )
    job.refresh_from_db()
    assert job.state == UpdateJob.State.ROLLED_BACK
    assert [(c.name, c.ok) for c in job.verification_checks] == [("serves", True), ("p99", False)]
    page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert 'data-check="serves"' in page and 'data-check="p99"' in page
    assert "p99 95.5 ms is over 3x" in page and "check-failed" in page


def test_a_malformed_verification_list_shows_nothing(fleet: Fleet) -> None:
    job = UpdateJob(node=fleet.node_a, result={"verification": "not a list"})
    assert job.verification_checks == []
    job.result = {"verification": [{"name": 3, "ok": "yes"}, "x"]}
    (check,) = job.verification_checks
    assert (check.name, check.ok) == ("3", False)

"""A download's rate and time left, from the agent's progress report to the node page."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_release
from tests.jobs.test_outbox import RecordingTransport
from updates.fleet.validation import ProgressReport, ReportFieldInvalid
from updates.jobs import services as jobs
from updates.models import UpdateJob

pytestmark = pytest.mark.django_db


def _payload(**extra: Any) -> dict[str, Any]:
    return {
        "job_id": "7",
        "node_id": "a-1",
        "step": "DOWNLOADING",
        "percent": 9,
        "bytes_done": 10,
        "bytes_total": 40,
        **extra,
    }


def test_rate_and_eta_are_optional_whole_numbers() -> None:
    report = ProgressReport.from_payload(_payload(bytes_per_second=2_500_000, eta_seconds=12))
    assert (report.bytes_per_second, report.eta_seconds) == (2_500_000, 12)
    older = ProgressReport.from_payload(_payload())  # an agent from before: still fine
    assert (older.bytes_per_second, older.eta_seconds) == (None, None)
    for bad in ({"bytes_per_second": -1}, {"eta_seconds": 1.5}, {"eta_seconds": 2**40}):
        with pytest.raises(ReportFieldInvalid):
            ProgressReport.from_payload(_payload(**bad))


def test_the_node_page_shows_bytes_rate_and_time_left(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=RecordingTransport()
    )
    jobs.job_record_progress(
        job_id=job.pk,
        node_id="a-1",
        step="DOWNLOADING",
        percent=9,
        bytes_done=10 << 20,
        bytes_total=40 << 20,
        bytes_per_second=2 << 20,
        eta_seconds=15,
    )
    stored = UpdateJob.objects.values_list("bytes_per_second", "eta_seconds").get(pk=job.pk)
    assert stored == (2 << 20, 15)
    page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "10.0\xa0MB of 40.0\xa0MB · 2.0\xa0MB/s · 15 s left" in page

"""Update and rollback jobs end to end: real Redis, a real coordinator worker,
a real node agent applying real signed bundles to its install dir."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypedDict

import pytest
from django.db import connection
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.conftest import Fleet
from tests.helpers import publish_bundle, tree
from updates.engine.apply import apply_bundle
from updates.engine.devpki import Pki
from updates.jobs import services as jobs
from updates.jobs.transport import CeleryNodeTransport
from updates.models import Node, UpdateJob

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# the make_bundle fixture: version, then keyword options -> path of the signed bundle
MakeBundle = Callable[..., Path]


class Stack(TypedDict):
    transport: CeleryNodeTransport
    install: Path
    state: Path
    logs: Callable[[], str]


def _wait_final(job: UpdateJob, timeout: float = 60) -> UpdateJob:
    done = procs.wait_until(
        lambda: UpdateJob.objects.get(pk=job.pk).state in UpdateJob.FINAL_STATES, timeout
    )
    job.refresh_from_db()
    assert done, f"job stuck in {job.state}"
    return job


@contextmanager
def _running_stack(
    tmp_path: Path,
    trusted: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
    **agent_extra: str,
) -> Iterator[Stack]:
    """Coordinator + the agent of node a-1, whose health check fails when a
    file named bin/broken is installed. Agents download from the live server."""
    settings.THEMIS_PUBLIC_URL = live_server.url
    env = procs.dashboard_env(
        redis_url, connection.settings_dict["NAME"], THEMIS_VAR_DIR=str(tmp_path)
    )
    coordinator = procs.coordinator(env, tmp_path, beat=False)
    node_dir = tmp_path / "a-1"
    install = node_dir / "install"
    agent_env = procs.agent_env(
        redis_url,
        "a-1",
        node_dir,
        THEMIS_HEARTBEAT_SECONDS="0.3",
        THEMIS_TRUST_ANCHOR=str(trusted.root),
        THEMIS_HEALTH_CMD=f"test ! -e {install}/bin/broken",
        **agent_extra,
    )
    agent = procs.agent("a-1", agent_env, tmp_path)
    try:
        yield {
            "transport": CeleryNodeTransport(),
            "install": install,
            "state": node_dir / "state",
            "logs": lambda: coordinator.output()[-3000:] + agent.output()[-3000:],
        }
    finally:
        agent.kill()
        coordinator.kill()


@pytest.fixture
def stack(
    tmp_path: Path,
    fleet: Fleet,
    trusted: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
) -> Iterator[Stack]:
    with _running_stack(tmp_path, trusted, redis_url, live_server, settings) as running:
        yield running


class Gate:
    """Files of a drain hook that holds the job until the test lets it go."""

    def __init__(self, root: Path) -> None:
        self.held, self.open = root / "drain-held", root / "drain-open"

    def command(self) -> str:
        # Bounded: after 60 s the hook fails, and so does the job (never a hang).
        return (
            f"touch {self.held}; for i in $(seq 600); do "
            f"[ -e {self.open} ] && exit 0; sleep 0.1; done; exit 1"
        )


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path)


@pytest.fixture
def gated_stack(
    tmp_path: Path,
    fleet: Fleet,
    trusted: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
    gate: Gate,
) -> Iterator[Stack]:
    """The same stack, whose agent drains (after the download) through `gate`."""
    with _running_stack(
        tmp_path, trusted, redis_url, live_server, settings, THEMIS_DRAIN_CMD=gate.command()
    ) as running:
        yield running


def test_update_health_failure_and_rollback_through_real_agent(
    stack: Stack, make_bundle: MakeBundle, trusted: Pki
) -> None:
    install, state = stack["install"], stack["state"]
    base = make_bundle("1.0.0", files={"bin/themisd": b"v1.0", "lib/old.so": b"old"})
    apply_bundle(base, target=install, state_dir=state, trust_anchor=trusted.root)
    before = tree(install)

    good = publish_bundle(make_bundle("1.7.0", files={"bin/themisd": b"v1.7"}), "1.7.0")
    job = jobs.job_start_update(
        node=Node.objects.get(node_id="a-1"),
        release=good,
        user=None,
        transport=stack["transport"],
    )
    job = _wait_final(job)
    assert job.state == "DONE", (job.error_code, job.error_message, stack["logs"]())
    assert (install / "bin/themisd").read_bytes() == b"v1.7"
    node = Node.objects.get(node_id="a-1")
    assert node.installed_version == "1.7.0"
    assert job.result["version_to"] == "1.7.0"
    assert procs.wait_until(lambda: len(Node.objects.get(node_id="a-1").restore_points) >= 2, 10)

    after_good = tree(install)
    bad = publish_bundle(
        make_bundle("1.8.0", files={"bin/themisd": b"v1.8", "bin/broken": b"x"}), "1.8.0"
    )
    job = jobs.job_start_update(node=node, release=bad, user=None, transport=stack["transport"])
    job = _wait_final(job)
    assert (job.state, job.error_code) == ("ROLLED_BACK", "HEALTH_CHECK_FAILED_ROLLED_BACK")
    assert tree(install) == after_good  # exactly the previous version
    assert Node.objects.get(node_id="a-1").installed_version == "1.7.0"

    node = Node.objects.get(node_id="a-1")
    point = next(p for p in node.restore_points if p.get("version") == "1.0.0")
    job = jobs.job_start_rollback(
        node=node, point_id=point["id"], user=None, transport=stack["transport"]
    )
    job = _wait_final(job)
    assert job.state == "DONE", (job.error_code, job.error_message)
    assert tree(install) == before
    assert Node.objects.get(node_id="a-1").installed_version == "1.0.0"
    states = [e for e in UpdateJob.objects.order_by("pk").values_list("kind", "state")]
    assert states == [("update", "DONE"), ("update", "ROLLED_BACK"), ("rollback", "DONE")]


def test_tampered_artifact_is_refused_by_the_agent(stack: Stack, make_bundle: MakeBundle) -> None:
    release = publish_bundle(make_bundle("1.7.0"), "1.7.0")
    path = Path(release.artifact.path)
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # storage corrupted (or swapped) after publishing
    path.write_bytes(bytes(data))
    job = jobs.job_start_update(
        node=Node.objects.get(node_id="a-1"),
        release=release,
        user=None,
        transport=stack["transport"],
    )
    job = _wait_final(job)
    assert (job.state, job.error_code) == ("FAILED", "MANIFEST_INVALID")
    assert not stack["install"].exists() or tree(stack["install"]) == {}


def test_heartbeats_continue_while_a_job_holds_the_agent_and_a_200mb_bundle_installs(
    gated_stack: Stack, gate: Gate, make_bundle: MakeBundle
) -> None:
    payload = os.urandom(200 << 20)
    release = publish_bundle(make_bundle("2.0.0", files={"bin/big": payload}), "2.0.0")
    del payload
    job = jobs.job_start_update(
        node=Node.objects.get(node_id="a-1"),
        release=release,
        user=None,
        transport=gated_stack["transport"],
    )

    def heartbeat() -> datetime | None:
        return Node.objects.values_list("last_heartbeat", flat=True).get(node_id="a-1")

    # The bundle is downloaded and the job waits in the drain hook, holding a worker thread.
    assert procs.wait_until(gate.held.exists, 120), gated_stack["logs"]()
    beats = {heartbeat()}

    def three_more() -> bool:
        beats.add(heartbeat())
        return len(beats) >= 4

    # One every 0.3 s from an agent whose heartbeat does not wait for its jobs; none at all
    # from one whose heartbeat does (the deadline only bounds the wait).
    assert procs.wait_until(three_more, 30, 0.05), (beats, gated_stack["logs"]())

    # Still held meanwhile: downloaded in full, not verified yet (the drain step does not
    # move a job back from DOWNLOADING). The progress report travels on the job queue, not
    # the heartbeats' one, so it may be stored after those heartbeats: wait for it too.
    def held_downloaded() -> bool:
        held = UpdateJob.objects.get(pk=job.pk)
        return held.state == "DOWNLOADING" and held.bytes_done == held.bytes_total

    assert procs.wait_until(held_downloaded, 30), gated_stack["logs"]()
    held = UpdateJob.objects.get(pk=job.pk)
    assert held.bytes_total is not None and held.bytes_done == held.bytes_total

    gate.open.touch()
    job = _wait_final(job, 180)
    assert job.state == "DONE", (job.error_code, job.error_message, gated_stack["logs"]())
    assert (gated_stack["install"] / "bin/big").stat().st_size == 200 << 20
    assert Node.objects.get(node_id="a-1").installed_version == "2.0.0"

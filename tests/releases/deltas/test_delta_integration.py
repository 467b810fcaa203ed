"""Delta updates end to end: a real coordinator builds the delta in the
background, a real agent downloads it from the live server and rebuilds the
new files from its installed ones, fetching the full bundle only for a file
whose base on the node was altered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypedDict

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.conftest import Fleet
from tests.helpers import MakeBundle, publish_bundle, tree
from tests.releases.deltas.conftest import release_files
from updates.engine.apply import apply_bundle
from updates.engine.devpki import Pki
from updates.jobs import services as jobs
from updates.jobs.transport import CeleryNodeTransport
from updates.models import Event, Node, Release, ReleaseFile, UpdateJob
from updates.releases import deltas
from updates.releases.services import release_publish

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


class Stack(TypedDict):
    """The `stack` fixture: node a-1's install and state folders, and the logs."""

    install: Path
    state: Path
    logs: Callable[[], str]


@pytest.fixture
def stack(
    tmp_path: Path,
    fleet: Fleet,
    signing: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
) -> Iterator[Stack]:
    settings.THEMIS_PUBLIC_URL = live_server.url
    env = procs.dashboard_env(
        redis_url,
        connection.settings_dict["NAME"],
        THEMIS_VAR_DIR=str(tmp_path),  # so MEDIA_ROOT is this test's tmp_path/media
        THEMIS_TRUST_ANCHOR=str(signing.root),
        THEMIS_SIGNING_KEY=str(signing.leaf.key),
        THEMIS_SIGNING_CERT=str(signing.leaf.cert),
        THEMIS_SIGNING_CHAIN=str(signing.chain),
        THEMIS_DELTA_BASES="2",
    )
    coordinator = procs.coordinator(env, tmp_path, beat=False)
    node_dir = tmp_path / "a-1"
    agent = procs.agent(
        "a-1",
        procs.agent_env(
            redis_url,
            "a-1",
            node_dir,
            THEMIS_HEARTBEAT_SECONDS="0.3",
            THEMIS_TRUST_ANCHOR=str(signing.root),
        ),
        tmp_path,
    )
    try:
        yield {
            "install": node_dir / "install",
            "state": node_dir / "state",
            "logs": lambda: coordinator.output()[-3000:] + agent.output()[-3000:],
        }
    finally:
        procs.stop_all([agent, coordinator])


def _node_on_160(stack: Stack, make_bundle: MakeBundle, signing: Pki) -> None:
    base = make_bundle("1.6.0", files=release_files("1.6.0"))
    apply_bundle(base, target=stack["install"], state_dir=stack["state"], trust_anchor=signing.root)
    Node.objects.filter(node_id="a-1").update(installed_version="1.6.0")
    publish_bundle(base, "1.6.0")


def _update(release: Release, stack: Stack) -> UpdateJob:
    job = jobs.job_start_update(
        node=Node.objects.get(node_id="a-1"),
        release=release,
        user=None,
        transport=CeleryNodeTransport(),
    )
    finished = procs.wait_until(
        lambda: UpdateJob.objects.get(pk=job.pk).state in UpdateJob.FINAL_STATES, 60
    )
    job.refresh_from_db()
    assert finished, (job.state, stack["logs"]())
    return job


def test_node_on_base_installs_from_the_delta_built_by_the_coordinator(
    stack: Stack, make_bundle: MakeBundle, signing: Pki
) -> None:
    _node_on_160(stack, make_bundle, signing)
    bundle = make_bundle("1.7.0", files=release_files("1.7.0"))
    # Published as an operator's upload: the coordinator builds the delta.
    release = release_publish(
        upload=SimpleUploadedFile(bundle.name, bundle.read_bytes()), user=None
    )
    built = procs.wait_until(
        lambda: Event.objects.filter(
            verb="release.delta_finished", object_id=str(release.pk)
        ).exists(),
        60,
    )
    assert built, stack["logs"]()
    delta = ReleaseFile.objects.get(release=release, base_version="1.6.0")
    assert delta.size < release.size

    job = _update(release, stack)

    assert job.state == "DONE", (job.error_code, job.error_message, stack["logs"]())
    assert job.result["files_fallback"] == []
    # The delta was downloaded, not the full bundle. The download's last report travels on
    # its own and may arrive after the final one: waited for, with a deadline.
    figures = procs.wait_until(
        lambda: UpdateJob.objects.get(pk=job.pk).bytes_total == delta.size, 10
    )
    assert figures, (UpdateJob.objects.get(pk=job.pk).bytes_total, delta.size)
    assert tree(stack["install"]) == release_files("1.7.0")
    assert Node.objects.get(node_id="a-1").installed_version == "1.7.0"


def test_altered_base_file_falls_back_to_the_full_bundle(
    stack: Stack, make_bundle: MakeBundle, signing: Pki
) -> None:
    _node_on_160(stack, make_bundle, signing)
    (stack["install"] / "bin/themisd").write_bytes(b"hand-patched on the node\n")
    release = publish_bundle(make_bundle("1.7.0", files=release_files("1.7.0")), "1.7.0")
    assert deltas.release_deltas_generate(release_id=release.pk)

    job = _update(release, stack)

    assert job.state == "DONE", (job.error_code, job.error_message, stack["logs"]())
    assert job.result["files_fallback"] == ["bin/themisd"]
    assert tree(stack["install"]) == release_files("1.7.0")
    leftovers = list((stack["state"] / "downloads").glob("*"))
    assert leftovers == []

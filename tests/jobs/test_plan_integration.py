"""A multi-component update end to end: real Redis, a real coordinator worker, a real node
agent running a server and a storage engine. The dashboard resolves the plan, the agent
downloads every step with the job's one token and installs them all or none; the job,
its steps and the node's components end as the agent reports."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.files import File
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.conftest import Fleet
from tests.helpers import tree
from tests.jobs.test_jobs_integration import Stack, _running_stack, _wait_final
from updates.engine.apply import apply_bundle
from updates.engine.bundle import create_bundle
from updates.engine.devpki import Pki
from updates.engine.manifest import Dependency
from updates.jobs import selectors as plans
from updates.jobs import services as jobs
from updates.models import Node, Release

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STORAGE = "themis-storage"


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    return tmp_path / "a-1" / "storage"


@pytest.fixture
def stack(
    tmp_path: Path,
    fleet: Fleet,
    trusted: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
    storage_dir: Path,
) -> Iterator[Stack]:
    components = [
        {
            "product": STORAGE,
            "install_dir": str(storage_dir / "install"),
            "state_dir": str(storage_dir / "state"),
        }
    ]
    with _running_stack(
        tmp_path,
        trusted,
        redis_url,
        live_server,
        settings,
        THEMIS_COMPONENTS=json.dumps(components),
    ) as running:
        yield running


def _bundle(
    tmp_path: Path,
    pki: Pki,
    product: str,
    version: str,
    files: dict[str, bytes],
    *needs: tuple[str, str],
) -> Path:
    src = tmp_path / f"src-{product}-{version}"
    for rel, content in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    out = tmp_path / f"{product}-{version}.tar"
    dependencies = [Dependency(product, constraint) for product, constraint in needs]
    create_bundle(
        src,
        product=product,
        version=version,
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
        dependencies=dependencies,
    )
    return out


def _publish(
    tmp_path: Path,
    pki: Pki,
    product: str,
    version: str,
    files: dict[str, bytes],
    *needs: tuple[str, str],
) -> Release:
    """Build, sign and store a release as an upload leaves it (its manifest read back)."""
    path = _bundle(tmp_path, pki, product, version, files, *needs)
    release = Release(product=product, version=version, size=path.stat().st_size)
    release.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    release.manifest = {
        "product": product,
        "version": version,
        "dependencies": [{"product": p, "constraint": c} for p, c in needs],
    }
    with open(path, "rb") as fh:
        release.artifact.save(path.name, File(fh), save=False)
    release.save()
    return release


def _components() -> dict[str, str]:
    return plans.node_installed_versions(Node.objects.get(node_id="a-1"))


def test_a_two_component_plan_goes_on_whole_and_a_failed_one_comes_off_whole(
    stack: Stack, tmp_path: Path, trusted: Pki, storage_dir: Path
) -> None:
    install = stack["install"]
    for product, target, state in (
        ("themisdb", install, stack["state"]),
        (STORAGE, storage_dir / "install", storage_dir / "state"),
    ):
        base = _bundle(tmp_path, trusted, product, "1.0.0", {"share/VERSION": b"1.0.0"})
        apply_bundle(
            base, target=target, state_dir=state, trust_anchor=trusted.root, product=product
        )
    # The agent's heartbeats tell the dashboard what the node runs.
    both = {"themisdb": "1.0.0", STORAGE: "1.0.0"}
    assert procs.wait_until(lambda: _components() == both, 20), stack["logs"]()

    storage = _publish(tmp_path, trusted, STORAGE, "1.1.0", {"share/VERSION": b"s1.1"})
    server = _publish(
        tmp_path, trusted, "themisdb", "1.7.0", {"bin/themisd": b"v1.7"}, (STORAGE, ">=1.1")
    )
    node = Node.objects.get(node_id="a-1")
    job = jobs.job_start_update(node=node, release=server, user=None, transport=stack["transport"])
    assert [s.label for s in job.plan_steps] == [
        f"{STORAGE} 1.0.0 → 1.1.0",
        "themisdb 1.0.0 → 1.7.0",
    ]
    job = _wait_final(job)
    assert job.state == "DONE", (job.error_code, job.error_message, stack["logs"]())
    assert (install / "bin/themisd").read_bytes() == b"v1.7"
    assert (storage_dir / "install" / "share/VERSION").read_bytes() == b"s1.1"
    assert _components() == {"themisdb": "1.7.0", STORAGE: "1.1.0"}
    assert [row.state for row in job.plan_rows] == ["applied", "applied"]
    assert storage.pk in job.plan_release_ids

    # Now one whose second step fails its health check: the first comes off again.
    storage_before = tree(storage_dir / "install")
    _publish(tmp_path, trusted, STORAGE, "1.2.0", {"share/VERSION": b"s1.2"})
    files = {"bin/themisd": b"v1.8", "bin/broken": b"x"}
    broken = _publish(tmp_path, trusted, "themisdb", "1.8.0", files, (STORAGE, ">=1.2"))
    node.refresh_from_db()
    job = jobs.job_start_update(node=node, release=broken, user=None, transport=stack["transport"])
    job = _wait_final(job)
    assert job.state == "ROLLED_BACK", (job.error_code, job.error_message, stack["logs"]())
    assert job.error_message.startswith("step 2 of 2 (themisdb 1.8.0)")
    assert job.failed_step == 2
    assert [(row.failed, row.state) for row in job.plan_rows] == [
        (False, "rolled_back"),
        (True, "failed"),
    ]
    assert tree(storage_dir / "install") == storage_before
    assert procs.wait_until(lambda: _components() == {"themisdb": "1.7.0", STORAGE: "1.1.0"}, 20), (
        stack["logs"]()
    )

"""The dashboard builds, signs and stores delta bundles of a published release."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tests.helpers import MakeBundle, tree
from tests.hsm_fixtures import Token, make_token
from tests.releases.deltas.conftest import Publish, release_files
from updates import taskqueue
from updates.audit import event_log
from updates.engine.apply import apply_bundle
from updates.engine.bundle import verify_bundle
from updates.engine.devpki import Pki
from updates.models import Event, Release, ReleaseFile
from updates.releases import deltas
from updates.releases.services import release_publish
from updates.releases.tasks import generate_release_deltas
from updates.taskqueue import TaskName

pytestmark = pytest.mark.django_db


def _events(verb: str, release: Release) -> list[dict[str, Any]]:  # the events' JSON details
    return [
        e.details for e in Event.objects.filter(verb=verb, object_id=str(release.pk)).order_by("pk")
    ]


def test_delta_is_built_signed_stored_and_logged(
    publish: Publish, signing: Pki, tmp_path: Path
) -> None:
    publish("1.6.0")
    new = publish("1.7.0")
    steps: list[tuple[int, int, str]] = []

    files = deltas.release_deltas_generate(
        release_id=new.pk, progress=lambda *step: steps.append(step)
    )

    assert [(f.kind, f.base_version) for f in files] == [("delta", "1.6.0")]
    delta = files[0]
    path = Path(delta.file.path)
    assert path.is_file() and path.stat().st_size == delta.size
    assert delta.size < new.size * 0.5, (delta.size, new.size)
    print(f"full {new.size} B, delta {delta.size} B")
    with verify_bundle(path, trust_anchor=signing.root) as verified:
        assert verified.manifest.version == "1.7.0"
        assert verified.delta_paths >= {"bin/themisd", "lib/libthemis.so"}
    created = _events("release.delta_created", new)
    assert created == [
        {
            "version": "1.7.0",
            "base_version": "1.6.0",
            "full_size": new.size,
            "delta_size": delta.size,
            "percent_saved": deltas.percent_saved(delta.size, new.size),
            "patched_files": created[0]["patched_files"],
            "sha256": delta.sha256,
        }
    ]
    assert len(_events("release.delta_started", new)) == 1
    assert _events("release.delta_finished", new) == [{"created": ["1.6.0"], "skipped": {}}]
    assert steps == [(0, 1, "1.6.0"), (1, 1, "")]

    # A node on 1.6.0 rebuilds exactly 1.7.0 from it.
    target, state = tmp_path / "node", tmp_path / "state"
    base = Release.objects.get(version="1.6.0")
    apply_bundle(
        Path(base.artifact.path), target=target, state_dir=state, trust_anchor=signing.root
    )
    result = apply_bundle(path, target=target, state_dir=state, trust_anchor=signing.root)
    assert result.files_fallback == []
    assert tree(target) == release_files("1.7.0")

    # Idempotent: a second run keeps the one delta.
    again = deltas.release_deltas_generate(release_id=new.pk)
    assert [f.pk for f in again] == [delta.pk]
    assert ReleaseFile.objects.filter(release=new).count() == 1
    assert len(_events("release.delta_created", new)) == 1


def test_bases_are_the_last_n_older_releases_by_version(
    publish: Publish, settings: Settings
) -> None:
    for version in ("1.6.0", "1.9.0", "1.10.0", "1.8.0"):
        publish(version)
    newest = Release.objects.get(version="1.10.0")
    assert [r.version for r in deltas.delta_bases(newest)] == ["1.9.0", "1.8.0"]
    assert [r.version for r in deltas.delta_bases(newest, 5)] == ["1.9.0", "1.8.0", "1.6.0"]
    older = Release.objects.get(version="1.8.0")
    assert [r.version for r in deltas.delta_bases(older)] == ["1.6.0"]
    Release.objects.filter(version="1.9.0").update(state=Release.State.DEPRECATED)
    assert [r.version for r in deltas.delta_bases(newest)] == ["1.8.0", "1.6.0"]
    settings.THEMIS_DELTA_BASES = 0
    assert deltas.delta_bases(newest) == []
    assert not deltas.deltas_wanted(newest)


def test_two_bases_get_two_deltas(publish: Publish) -> None:
    publish("1.5.0")
    publish("1.6.0")
    new = publish("1.7.0")
    files = deltas.release_deltas_generate(release_id=new.pk)
    assert sorted(f.base_version for f in files) == ["1.5.0", "1.6.0"]
    assert all(f.size < new.size for f in files)


def test_delta_that_saves_too_little_is_skipped_with_a_reason(publish: Publish) -> None:
    publish("1.6.0", files={"bin/themisd": b"a" * 10 + bytes(range(256)) * 40})
    new = publish("1.7.0", files={"bin/themisd": os.urandom(20 << 10)})
    assert deltas.release_deltas_generate(release_id=new.pk) == []
    assert not ReleaseFile.objects.exists()
    (skipped,) = _events("release.delta_skipped", new)
    assert skipped["base_version"] == "1.6.0"
    assert "saves too little" in skipped["reason"]
    assert skipped["delta_size"] >= 0.9 * new.size
    # Nothing left behind: no rejected delta, no scratch directory.
    stored = sorted(p.name for p in Path(new.artifact.path).parent.iterdir())
    assert stored == sorted(Path(r.artifact.path).name for r in Release.objects.all())


def test_without_signing_key_nothing_is_built(
    publish: Publish, settings: Settings, tmp_path: Path
) -> None:
    publish("1.6.0")
    new = publish("1.7.0")
    settings.THEMIS_SIGNING_KEY = tmp_path / "missing.key"
    assert deltas.release_deltas_generate(release_id=new.pk) == []
    assert not deltas.deltas_wanted(new)
    assert not Event.objects.filter(verb__startswith="release.delta").exists()


def test_publish_schedules_generation_after_commit(
    publish: Publish,
    make_bundle: MakeBundle,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    sent: list[int] = []

    def send_task(name: TaskName, *args: int, countdown: float | None = None) -> None:
        if name == TaskName.GENERATE_RELEASE_DELTAS:  # the parts' extraction is queued too
            sent.append(*args)

    monkeypatch.setattr(taskqueue, "send_task", send_task)
    bundle = make_bundle("1.6.0", files=release_files("1.6.0"))
    with django_capture_on_commit_callbacks(execute=True):
        release_publish(upload=SimpleUploadedFile("a.tar", bundle.read_bytes()), user=None)
    assert sent == []  # nothing earlier: no deltas to make
    bundle = make_bundle("1.7.0", files=release_files("1.7.0"))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        release = release_publish(
            upload=SimpleUploadedFile("b.tar", bundle.read_bytes()), user=None
        )
    assert sent == []
    for callback in callbacks:
        callback()
    assert sent == [release.pk]


def test_task_runs_the_service(publish: Publish) -> None:
    publish("1.6.0")
    new = publish("1.7.0")
    assert generate_release_deltas.run(new.pk) == ["1.6.0"]


def test_release_page_shows_savings_and_progress(
    publish: Publish, personas: dict[str, Client]
) -> None:
    publish("1.6.0")
    new = publish("1.7.0")
    deltas.release_deltas_generate(release_id=new.pk)
    delta = ReleaseFile.objects.get()
    saved = deltas.percent_saved(delta.size, new.size)
    body = personas["operator"].get(reverse("release_list")).content.decode()
    assert f"saves {saved} % for nodes on 1.6.0" in body
    assert "Generating delta bundles" not in body

    event_log(verb="release.delta_started", obj=new, details={})
    body = personas["admin_a"].get(reverse("release_list")).content.decode()
    assert "Generating delta bundles" in body
    event_log(verb="release.delta_finished", obj=new, details={})
    body = personas["operator"].get(reverse("release_list")).content.decode()
    assert "Generating delta bundles" not in body


def test_stale_scratch_dirs_of_dead_builds_are_swept(settings: Settings, tmp_path: Path) -> None:
    import os
    import time

    from updates.releases.deltas import (
        STALE_WORK_SECONDS,
        WORK_PREFIX,
        _releases_dir,
        sweep_stale_work_dirs,
    )

    releases = _releases_dir()
    old = releases / f"{WORK_PREFIX}dead"
    (old / "new").mkdir(parents=True)
    (old / "new" / "file").write_bytes(b"x")
    fresh = releases / f"{WORK_PREFIX}running"
    fresh.mkdir()
    stale_time = time.time() - STALE_WORK_SECONDS - 10
    os.utime(old, (stale_time, stale_time))
    assert sweep_stale_work_dirs() == [old.name]
    assert not old.exists() and fresh.exists()


@pytest.fixture(scope="session")
def dashboard_token(tmp_path_factory: pytest.TempPathFactory, test_pki: Pki) -> Token:
    return make_token(tmp_path_factory, test_pki, "themis-dashboard")


def test_delta_bundles_are_signed_with_a_key_in_a_token(
    publish: Publish, signing: Pki, settings: Settings, dashboard_token: Token
) -> None:
    """THEMIS_SIGNING_PKCS11_URI: the dashboard signs its delta bundles in the token (the
    key never on its disk); nodes take them as any other release."""
    publish("1.6.0")
    new = publish("1.7.0")
    settings.THEMIS_SIGNING_PKCS11_URI = dashboard_token.uri("release-ec")
    settings.THEMIS_SIGNING_PIN_SOURCE = f"file:{dashboard_token.pin_file}"
    settings.THEMIS_SIGNING_CERT = dashboard_token.ec_cert
    settings.THEMIS_SIGNING_KEY = Path("/nonexistent/no-key-on-disk.pem")
    [delta] = deltas.release_deltas_generate(release_id=new.pk)
    with verify_bundle(Path(delta.file.path), trust_anchor=signing.root) as verified:
        assert "HSM signer hsm-ec" in verified.signer
        assert verified.manifest.version == "1.7.0"

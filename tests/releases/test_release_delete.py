"""Deprecating and deleting releases: persona checks, rows, events and files on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tests.conftest import Fleet
from tests.releases.conftest import MakeJob, MakeRelease, stored_files
from updates.models import ArtifactTombstone, Event, Release, ReleaseFile, Rollout, UpdateJob
from updates.releases.services import ReleaseInUse, release_delete
from updates.releases.storage import artifact_tombstones_cleanup

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

pytestmark = pytest.mark.django_db


def _post(client: Client, name: str, release: Release) -> _MonkeyPatchedWSGIResponse:
    return client.post(reverse(name, args=[release.pk]), follow=True)


def test_operator_deprecates_a_release(
    personas: dict[str, Client], make_release: MakeRelease
) -> None:
    release = make_release()
    response = _post(personas["operator"], "release_deprecate", release)
    assert response.status_code == 200
    assert b"Deprecated themisdb 1.7.0" in response.content
    release.refresh_from_db()
    assert release.state == Release.State.DEPRECATED
    event = Event.objects.get(verb="release.deprecated")
    assert (event.actor_label, event.object_id) == ("olivia", str(release.pk))


def test_deprecating_twice_logs_once(
    personas: dict[str, Client], make_release: MakeRelease
) -> None:
    release = make_release()
    _post(personas["operator"], "release_deprecate", release)
    response = _post(personas["operator"], "release_deprecate", release)
    assert b"already deprecated" in response.content
    assert Event.objects.filter(verb="release.deprecated").count() == 1


def test_operator_deletes_a_release_with_three_files(
    personas: dict[str, Client],
    make_release: MakeRelease,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    release = make_release(deltas=2)
    names = [release.artifact.name, *release.files.values_list("file", flat=True)]
    assert len(names) == 3 and stored_files() == sorted(names)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(personas["operator"], "release_delete", release)
    assert response.status_code == 200
    assert b"Deleted themisdb 1.7.0 and its files" in response.content
    assert len(callbacks) == 1
    assert not Release.objects.exists() and not ReleaseFile.objects.exists()
    assert stored_files() == []
    assert not ArtifactTombstone.objects.exists()
    event = Event.objects.get(verb="release.deleted")
    assert event.actor_label == "olivia"
    assert sorted(event.details["files"]) == sorted(names)


@pytest.mark.parametrize("persona", ["responder", "admin_a", "admin_b"])
@pytest.mark.parametrize("action", ["release_deprecate", "release_delete"])
def test_only_operators_may_deprecate_or_delete(
    personas: dict[str, Client], make_release: MakeRelease, persona: str, action: str
) -> None:
    release = make_release(deltas=1)
    before = stored_files()
    response = personas[persona].post(reverse(action, args=[release.pk]))
    assert response.status_code == 403
    release.refresh_from_db()
    assert release.state == Release.State.PUBLISHED
    assert stored_files() == before
    assert not Event.objects.filter(verb__startswith="release.").exists()


@pytest.mark.parametrize("action", ["release_deprecate", "release_delete"])
def test_anonymous_is_sent_to_login(
    personas: dict[str, Client], make_release: MakeRelease, action: str
) -> None:
    release = make_release()
    response = personas["anonymous"].post(reverse(action, args=[release.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert Release.objects.filter(pk=release.pk, state=Release.State.PUBLISHED).exists()


@pytest.mark.parametrize("action", ["release_deprecate", "release_delete"])
def test_get_is_not_allowed(
    personas: dict[str, Client], make_release: MakeRelease, action: str
) -> None:
    release = make_release()
    assert personas["operator"].get(reverse(action, args=[release.pk])).status_code == 405
    assert Release.objects.filter(pk=release.pk, state=Release.State.PUBLISHED).exists()


def test_unknown_release_is_404(personas: dict[str, Client]) -> None:
    assert personas["operator"].post(reverse("release_delete", args=[999])).status_code == 404


@pytest.mark.parametrize("job_state", [UpdateJob.State.QUEUED, UpdateJob.State.DONE])
def test_delete_refused_while_a_job_references_it(
    personas: dict[str, Client],
    fleet: Fleet,
    make_release: MakeRelease,
    make_job: MakeJob,
    job_state: str,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    release = make_release(deltas=1)
    make_job(release, fleet.node_a, state=job_state)
    before = stored_files()
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(personas["operator"], "release_delete", release)
    assert b"referenced by 1 update job(s)" in response.content
    assert b"deprecate it instead" in response.content
    assert Release.objects.filter(pk=release.pk).exists()
    assert ReleaseFile.objects.filter(release=release).count() == 1
    assert stored_files() == before
    assert not ArtifactTombstone.objects.exists()
    assert not Event.objects.filter(verb="release.deleted").exists()


def test_delete_refused_while_a_rollout_references_it(
    make_release: MakeRelease, personas: dict[str, Client]
) -> None:
    release = make_release()
    Rollout.objects.create(release=release, strategy=Rollout.Strategy.ROLLING)
    with pytest.raises(ReleaseInUse, match="1 rollout"):
        release_delete(release=release, user=None)
    assert Release.objects.filter(pk=release.pk).exists()
    assert len(stored_files()) == 1


def test_crash_after_commit_is_finished_by_the_cleanup(
    make_release: MakeRelease, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    release = make_release(deltas=2)
    names = sorted([release.artifact.name, *release.files.values_list("file", flat=True)])
    # The process "dies" after the commit: the on-commit unlink never runs.
    with django_capture_on_commit_callbacks(execute=False):
        assert sorted(release_delete(release=release, user=None)) == names
    assert not Release.objects.exists()
    assert sorted(ArtifactTombstone.objects.values_list("path", flat=True)) == names
    assert stored_files() == names
    assert artifact_tombstones_cleanup() == 3
    assert stored_files() == []
    assert not ArtifactTombstone.objects.exists()
    assert artifact_tombstones_cleanup() == 0  # idempotent


def test_cleanup_of_an_already_missing_file_clears_the_tombstone() -> None:
    ArtifactTombstone.objects.create(path="releases/gone.tar")
    assert artifact_tombstones_cleanup() == 1
    assert not ArtifactTombstone.objects.exists()


@pytest.mark.parametrize("name", ["../outside.txt", "{abs}", "releases/../../outside.txt", ".."])
def test_cleanup_never_leaves_media_root(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    ArtifactTombstone.objects.create(path=name.format(abs=outside))
    assert artifact_tombstones_cleanup() == 1  # dropped: nothing it may do about it
    assert outside.read_text() == "keep me"
    assert not ArtifactTombstone.objects.exists()


def test_cleanup_does_not_follow_a_symlinked_directory(tmp_path: Path) -> None:
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    (outside_dir / "x.tar").write_text("keep me")
    media = Path(settings.MEDIA_ROOT)
    media.mkdir(parents=True, exist_ok=True)
    (media / "link").symlink_to(outside_dir)
    ArtifactTombstone.objects.create(path="link/x.tar")
    artifact_tombstones_cleanup()
    assert (outside_dir / "x.tar").read_text() == "keep me"


def test_cleanup_keeps_a_path_a_live_release_owns(make_release: MakeRelease) -> None:
    release = make_release()
    assert release.artifact.name is not None  # narrows: make_release stored a file
    ArtifactTombstone.objects.create(path=release.artifact.name)
    assert artifact_tombstones_cleanup() == 1
    assert stored_files() == [release.artifact.name]


def test_beat_task_runs_the_cleanup(settings: Settings) -> None:
    from updates.releases.tasks import cleanup_artifact_tombstones

    ArtifactTombstone.objects.create(path="releases/gone.tar")
    assert cleanup_artifact_tombstones.apply().get() == 1
    schedule = settings.CELERY_BEAT_SCHEDULE["cleanup-artifact-tombstones"]
    assert schedule["task"] == cleanup_artifact_tombstones.name


def test_release_page_shows_actions_to_operators_only(
    personas: dict[str, Client], make_release: MakeRelease
) -> None:
    make_release()
    operator_page = personas["operator"].get(reverse("release_list")).content
    responder_page = personas["responder"].get(reverse("release_list")).content
    assert b">Deprecate<" in operator_page and b">Delete<" in operator_page
    assert b"Verify and publish" in operator_page  # the upload form is still there
    assert b">Delete<" not in responder_page and b">Deprecate<" not in responder_page


@pytest.mark.django_db(transaction=True)
def test_delete_commits_for_real_then_removes_files(
    personas: dict[str, Client], make_release: MakeRelease
) -> None:
    """No captured callbacks: a real commit runs the on-commit unlink."""
    release = make_release(deltas=2)
    response = _post(personas["operator"], "release_delete", release)
    assert response.status_code == 200
    assert not Release.objects.exists()
    assert stored_files() == []
    assert not ArtifactTombstone.objects.exists()

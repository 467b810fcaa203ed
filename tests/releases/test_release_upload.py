"""Publishing a release verifies the bundle with the engine before storing it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from tests.helpers import MakeBundle
from tests.releases.conftest import queued_parts_marker
from updates.engine.devpki import Pki
from updates.models import Event, Release

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

pytestmark = pytest.mark.django_db


def _upload(client: Client, path: Path, channel: str = "stable") -> _MonkeyPatchedWSGIResponse:
    with open(path, "rb") as fh:
        upload = SimpleUploadedFile(path.name, fh.read())
    return client.post(reverse("release_upload"), {"bundle": upload, "channel": channel})


def _stored_files() -> list[str]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_operator_publishes_a_valid_bundle(
    personas: dict[str, Client], trusted: Pki, make_bundle: MakeBundle
) -> None:
    bundle = make_bundle("1.7.0")
    response = _upload(personas["operator"], bundle, channel="beta")
    assert response.status_code == 302
    release = Release.objects.get(version="1.7.0")
    assert release.channel == "beta"
    assert release.size == bundle.stat().st_size
    assert "codesign" in release.signer_subject.lower() or release.signer_subject
    assert release.manifest["files"][0]["path"] == "bin/themisd"
    assert release.artifact.name is not None  # narrows: the upload stored a file
    stored = Path(settings.MEDIA_ROOT) / release.artifact.name
    assert stored.read_bytes() == bundle.read_bytes()
    # The bundle, and the marker of its queued parts extraction (updates/releases/parts.py).
    assert _stored_files() == sorted([release.artifact.name, queued_parts_marker(release)])
    assert Event.objects.filter(verb="release.published", object_id=str(release.pk)).exists()


def _tampered(bundle: Path) -> Path:
    data = bytearray(bundle.read_bytes())
    index = data.index(b"echo 1.7.0")
    data[index] ^= 0x01  # one payload byte: the hash in the signed manifest no longer matches
    bundle.write_bytes(bytes(data))
    return bundle


@pytest.mark.parametrize(
    ("variant", "code"),
    [("tampered", "MANIFEST_INVALID"), ("rogue", "SIGNATURE_INVALID"), ("garbage", "")],
)
def test_invalid_bundle_is_refused_with_reason_and_nothing_stored(
    personas: dict[str, Client],
    trusted: Pki,
    make_bundle: MakeBundle,
    tmp_path: Path,
    variant: str,
    code: str,
) -> None:
    if variant == "tampered":
        bundle = _tampered(make_bundle("1.7.0"))
    elif variant == "rogue":
        bundle = make_bundle("1.7.0", signer=trusted.rogue_leaf, chain=trusted.rogue_chain)
    else:
        bundle = tmp_path / "junk.tar"
        bundle.write_bytes(b"not a tar archive at all" * 100)
    response = _upload(personas["operator"], bundle)
    assert response.status_code == 400
    body = response.content.decode()
    assert 'id="upload-error"' in body
    assert "Rejected (" in body and (code in body)
    assert not Release.objects.exists()
    assert _stored_files() == []
    event = Event.objects.get(verb="release.rejected")
    assert event.details["file"] == bundle.name
    assert event.actor_label == "olivia"


@pytest.mark.parametrize("persona", ["responder", "admin_a", "admin_b"])
def test_only_operators_may_publish(
    personas: dict[str, Client], trusted: Pki, make_bundle: MakeBundle, persona: str
) -> None:
    response = _upload(personas[persona], make_bundle("1.7.0"))
    assert response.status_code == 403
    assert not Release.objects.exists()
    assert _stored_files() == []


def test_anonymous_upload_redirects_to_login(
    personas: dict[str, Client], trusted: Pki, make_bundle: MakeBundle
) -> None:
    response = _upload(personas["anonymous"], make_bundle("1.7.0"))
    assert response.status_code == 302
    assert not Release.objects.exists()


def test_same_version_twice_is_refused(
    personas: dict[str, Client], trusted: Pki, make_bundle: MakeBundle
) -> None:
    assert _upload(personas["operator"], make_bundle("1.7.0")).status_code == 302
    again = make_bundle("1.7.0", name="again.tar", files={"bin/themisd": b"other"})
    response = _upload(personas["operator"], again)
    assert response.status_code == 400
    assert "already published" in response.content.decode()
    assert Release.objects.count() == 1
    # One bundle (and its queued parts extraction's marker): the refused one left nothing.
    assert [name for name in _stored_files() if not name.startswith("parts/")] == [
        Release.objects.get().artifact.name
    ]


def test_upload_form_shown_only_to_publishers(personas: dict[str, Client]) -> None:
    assert b"Verify and publish" in personas["operator"].get(reverse("release_list")).content
    assert b"Verify and publish" not in personas["responder"].get(reverse("release_list")).content

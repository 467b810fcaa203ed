"""Delta bundles: small real signed releases whose binaries differ a little."""

from __future__ import annotations

import random
from typing import Protocol

import pytest
from pytest_django import Settings

from tests.helpers import MakeBundle, publish_bundle
from updates.engine.devpki import Pki
from updates.models import Release


def release_files(version: str) -> dict[str, bytes]:
    """The files of a small release: 1.6.0 is the base; later versions change
    a few bytes of the binary, keep the library and add a config file."""
    rng = random.Random(7)
    binary = bytearray(rng.randbytes(48 << 10))
    library = rng.randbytes(32 << 10)
    files = {"bin/themisd": bytes(binary), "lib/libthemis.so": library}
    if version != "1.6.0":
        binary[20000:20100] = version.encode().ljust(100, b".")
        files["bin/themisd"] = bytes(binary) + b"\nnew code\n" * 50
        files["etc/themis.conf"] = f"version = {version}\n".encode()
    files["share/VERSION"] = f"{version}\n".encode()
    return files


class Publish(Protocol):
    """The type of the `publish` fixture."""

    def __call__(self, version: str, files: dict[str, bytes] | None = None) -> Release: ...


@pytest.fixture
def signing(settings: Settings, trusted: Pki, test_pki: Pki) -> Pki:
    """The dashboard's release pipeline signs with the test PKI's leaf."""
    settings.THEMIS_SIGNING_KEY = test_pki.leaf.key
    settings.THEMIS_SIGNING_CERT = test_pki.leaf.cert
    settings.THEMIS_SIGNING_CHAIN = test_pki.chain
    settings.THEMIS_DELTA_BASES = 2
    return test_pki


@pytest.fixture
def publish(make_bundle: MakeBundle, signing: Pki) -> Publish:
    """Publish a release (the default files for its version unless given)."""

    def go(version: str, files: dict[str, bytes] | None = None) -> Release:
        return publish_bundle(make_bundle(version, files=files or release_files(version)), version)

    return go

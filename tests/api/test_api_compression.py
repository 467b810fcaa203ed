"""API answers are gzip'd for a client that asks, and decode to the same JSON as an
uncompressed answer; a client that does not ask gets them as they are."""

from __future__ import annotations

import gzip
import json

import pytest
from rest_framework.test import APIClient

from tests.conftest import Fleet

pytestmark = pytest.mark.django_db


def test_a_client_asking_for_gzip_gets_the_same_json_compressed(
    api: dict[str, APIClient], fleet: Fleet
) -> None:
    client = api["operator"]
    plain = client.get("/api/v1/nodes/", HTTP_ACCEPT_ENCODING="identity")
    packed = client.get("/api/v1/nodes/", HTTP_ACCEPT_ENCODING="gzip")
    assert plain.status_code == packed.status_code == 200
    assert not plain.has_header("Content-Encoding")
    assert packed["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in packed["Vary"]
    assert json.loads(gzip.decompress(packed.content)) == plain.json()
    assert plain.json()["results"], "the fleet's nodes are listed"

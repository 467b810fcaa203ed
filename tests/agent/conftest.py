from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.bundle_server import BundleServer


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[BundleServer]:
    server = BundleServer(tmp_path / "served")
    yield server
    server.close()


# Delivery by parts: releases N and N+1, a node, a server of N+1's parts.
from tests.agent.parts_fixtures import node, parts_server, releases  # noqa: E402,F401 - fixtures

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

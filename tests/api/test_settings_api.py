"""THEMIS_API_RATE is read strictly, like every setting."""

from __future__ import annotations

import pytest

from tests.project.test_settings import _settings_import


@pytest.mark.parametrize("value", ["lots", "0/min", "10/fortnight", "10 / min"])
def test_a_malformed_rate_stops_start_up_naming_the_variable(value: str) -> None:
    result = _settings_import("themis_dashboard.settings.local", THEMIS_API_RATE=value)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "THEMIS_API_RATE" in result.stderr.splitlines()[-1]


def test_a_rate_in_any_unit_is_accepted() -> None:
    result = _settings_import("themis_dashboard.settings.local", THEMIS_API_RATE="20/s")
    assert result.returncode == 0, result.stderr

from __future__ import annotations

import pytest
from pytest_django import Settings

from updates.notifications.crypto import SecretUnreadable, decrypt_secrets, encrypt_secrets, mask


def test_round_trip_and_nothing_readable_at_rest(settings: Settings) -> None:
    token = encrypt_secrets({"url": "https://hooks.slack.com/services/T/B/SECRET"})
    assert "SECRET" not in token and "hooks" not in token
    assert decrypt_secrets(token) == {"url": "https://hooks.slack.com/services/T/B/SECRET"}


def test_another_secret_key_cannot_read_it(settings: Settings) -> None:
    token = encrypt_secrets({"routing_key": "k" * 32})
    settings.SECRET_KEY = "a-different-key-" + "z" * 40
    with pytest.raises(SecretUnreadable, match="enter them again"):
        decrypt_secrets(token)


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("https://hooks.slack.com/services/T0/B0/abcdefghijkl", "https://hooks.slack.com/…ijkl"),
        ("https://user:pw@example.com/hook?token=abcdefgh1234", "https://example.com/…1234"),
        ("R0UT1NGKEY0123456789abcdef012345", "…2345"),
        ("short", "…"),
    ],
)
def test_mask_shows_host_and_a_short_tail_only(value: str, masked: str) -> None:
    assert mask(value) == masked

"""Channel secrets (webhook URLs, routing keys, signing secrets) at rest.

Encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under a key derived from
SECRET_KEY by HKDF, so a database dump alone does not reveal them. Keys from
SECRET_KEY_FALLBACKS still decrypt, so rotating SECRET_KEY the Django way does
not silently break every channel.
"""

from __future__ import annotations

import base64
import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


class SecretUnreadable(Exception):
    """The stored secrets cannot be decrypted (SECRET_KEY changed without a fallback)."""


def _derive(secret_key: str) -> Fernet:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"themis-notifications",
        info=b"channel-secrets-v1",
    )
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(secret_key.encode())))


def _fernet() -> MultiFernet:
    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return MultiFernet([_derive(key) for key in keys])


def encrypt_secrets(values: dict[str, str]) -> str:
    return _fernet().encrypt(json.dumps(values, sort_keys=True).encode()).decode()


def decrypt_secrets(token: str) -> dict[str, str]:
    if not token:
        return {}
    try:
        data = json.loads(_fernet().decrypt(token.encode()))
    except (InvalidToken, ValueError):
        raise SecretUnreadable(
            "channel secrets cannot be decrypted (SECRET_KEY changed?): enter them again"
        ) from None
    return {str(k): str(v) for k, v in data.items()}


def mask(value: str, *, keep: int = 4) -> str:
    """What the UI may show of a secret: for URLs the host, and the last characters."""
    tail = value[-keep:] if len(value) > 3 * keep else ""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        return f"{scheme}://{host}/…{tail}"
    return f"…{tail}" if tail else "…"

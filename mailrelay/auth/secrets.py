"""
Password and API-key hashing: the only place that knows how secrets are stored.

Passwords: Argon2id (argon2-cffi's defaults), verified in constant time by the library.
API keys: ``mr_<keyid>_<secret>``, 256 bits of entropy; only the hex SHA-256 of the whole key is
stored, and the key is found by that hash (no slow hash needed for a high-entropy secret).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

API_KEY_PREFIX = "mr_"
_KEY_ID_BYTES = 6
_SECRET_BYTES = 32


def hashPassword(password: str) -> str:
    """An Argon2id hash string of ``password`` (slow by design: call it off the reactor thread)."""
    return _hasher.hash(password)


def verifyPassword(passwordHash: str, password: str) -> bool:
    """Whether ``password`` matches ``passwordHash``. Slow by design."""
    try:
        return _hasher.verify(passwordHash, password)
    except (VerificationError, InvalidHashError):
        return False


def newApiKey() -> tuple[str, str, str]:
    """A fresh API key: ``(keyId, key, keyHash)``. Show ``key`` once; store ``keyHash``."""
    keyId = secrets.token_hex(_KEY_ID_BYTES)
    key = f"{API_KEY_PREFIX}{keyId}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    return keyId, key, hashApiKey(key)


def hashApiKey(key: str) -> str:
    """The stored form of an API key: hex SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def sameHash(a: str, b: str) -> bool:
    """Constant-time comparison of two hash strings."""
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))

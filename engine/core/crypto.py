"""API keys (stored only as a hash) and webhook signing secrets (encrypted at rest)."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from engine.core.ids import random_token

__all__ = [
    "SecretBox",
    "hash_api_key",
    "key_matches",
    "new_api_key",
    "new_webhook_secret",
    "validate_fernet_keys",
]

_PLAIN = "plain:"
_FERNET = "fernet:"
_OPENED_MAX = 250_000


def new_api_key(mode: str) -> str:
    """`sk_test_…` or `sk_live_…` with 40 random characters."""
    return f"sk_{mode}_{random_token(40)}"


def hash_api_key(key: str) -> bytes:
    """SHA-256 of the key. Keys carry 200+ bits of entropy, so a fast hash is enough."""
    return hashlib.sha256(key.encode()).digest()


def key_matches(key: str, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_api_key(key), stored_hash)


def new_webhook_secret(mode: str) -> str:
    """`whsec_test_…` or `whsec_live_…` with 40 random characters."""
    return f"whsec_{mode}_{random_token(40)}"


def validate_fernet_keys(keys: tuple[str, ...]) -> None:
    """Raise ValueError naming the position of a key Fernet will not take."""
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            raise ValueError(
                f"key {position} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None


class SecretBox:
    """Seals signing secrets for storage. The first key encrypts; every key decrypts.

    With no key, secrets are stored marked as plain text, so encryption can be switched on
    later and `reseal` upgrades the old rows.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        fernets = [Fernet(k.encode()) for k in keys]
        self._first = fernets[0] if fernets else None
        self._fernet = MultiFernet(fernets) if fernets else None
        # Opened tokens, so the worker's periodic full reload does not decrypt every secret
        # again (about 20 us each). Bounded; emptied when full.
        self._opened: dict[str, str] = {}

    @property
    def encrypting(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None:
            return _PLAIN + secret
        return _FERNET + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if stored.startswith(_PLAIN):
            return stored[len(_PLAIN) :]
        if stored.startswith(_FERNET):
            if self._fernet is None:
                raise ValueError("secret is encrypted but CARGOLINT_SECRET_KEY is not set")
            if (secret := self._opened.get(stored)) is not None:
                return secret
            try:
                secret = self._fernet.decrypt(stored[len(_FERNET) :].encode()).decode()
            except InvalidToken:
                raise ValueError(
                    "secret was encrypted with a key not in CARGOLINT_SECRET_KEY"
                ) from None
            if len(self._opened) >= _OPENED_MAX:
                self._opened.clear()
            self._opened[stored] = secret
            return secret
        raise ValueError("stored secret has an unknown format")

    def needs_reseal(self, stored: str) -> bool:
        """True when `stored` is plain text, or not sealed with the current first key."""
        if self._first is None:
            return False
        if stored.startswith(_PLAIN):
            return True
        try:
            self._first.decrypt(stored[len(_FERNET) :].encode())
        except InvalidToken:
            return True
        return False

    def reseal(self, stored: str) -> str:
        return self.seal(self.open(stored))

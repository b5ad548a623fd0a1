"""Identifiers: random ones for new objects, deterministic ones for deliveries."""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["delivery_id", "new_id", "random_token"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def random_token(length: int) -> str:
    """`length` characters of [a-z0-9] from the OS's CSPRNG."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 20) -> str:
    """A fresh id such as `wh_k3j2...` (prefix + `_` + random [a-z0-9])."""
    return f"{prefix}_{random_token(length)}"


def delivery_id(webhook_id: str, account_id: str, event_id: str) -> str:
    """The one delivery id for an (event, webhook) pair.

    Deterministic, so a redelivered or republished event maps onto the rows it already made and
    the insert is idempotent.
    """
    digest = hashlib.sha256(f"{webhook_id}\x00{account_id}\x00{event_id}".encode()).digest()
    # base-36 of 120 bits gives 24 characters of [a-z0-9].
    n = int.from_bytes(digest[:15], "big")
    chars = []
    for _ in range(24):
        n, r = divmod(n, 36)
        chars.append(_ALPHABET[r])
    return "dlv_" + "".join(chars)

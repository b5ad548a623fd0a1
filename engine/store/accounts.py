"""Accounts and their API keys. A key is stored only as a hash; its plaintext is shown once.

Every request looks its key up here (one indexed read, no per-process cache), so a revoked key
is refused by every API replica from the moment the revocation commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.core.crypto import hash_api_key, key_matches, new_api_key
from engine.core.ids import new_id
from engine.store.db import Conn, TxConn

__all__ = [
    "KEY_PREFIXES",
    "IssuedKey",
    "KeyInfo",
    "Principal",
    "authenticate",
    "create_account",
    "create_key",
    "list_keys",
    "open_account",
    "revoke_key",
]

KEY_PREFIXES = ("sk_test_", "sk_live_")
# Enough of the key to tell keys apart in a listing, far too little to guess the rest.
_SHOWN_PREFIX = 12


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an API key speaks for: the account, its plan, and the key's mode."""

    key_id: str
    account_id: str
    plan: str
    mode: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just made: its id (to list and revoke it by) and its plaintext (shown once)."""

    account_id: str
    key_id: str
    api_key: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as listed: never the key itself, nor its hash."""

    key_id: str
    mode: str
    created_at: datetime
    revoked_at: datetime | None


async def _insert_key(conn: Conn, account_id: str, mode: str) -> IssuedKey:
    key = new_api_key(mode)
    key_id = new_id("key")
    await conn.execute(
        """INSERT INTO api_keys (id, account_id, mode, key_hash, key_prefix)
           VALUES ($1, $2, $3, $4, $5)""",
        key_id,
        account_id,
        mode,
        hash_api_key(key),
        key[:_SHOWN_PREFIX],
    )
    return IssuedKey(account_id, key_id, key)


async def open_account(
    conn: TxConn,
    *,
    name: str,
    plan: str,
    mode: str,
) -> IssuedKey:
    """Create an account with its first API key."""
    account_id = new_id("acct")
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (id, name, plan) VALUES ($1, $2, $3)", account_id, name, plan
        )
        return await _insert_key(conn, account_id, mode)


async def create_account(
    conn: TxConn,
    *,
    name: str,
    plan: str,
    mode: str,
) -> tuple[str, str]:
    """Create an account with its first API key; return (account id, key plaintext)."""
    issued = await open_account(conn, name=name, plan=plan, mode=mode)
    return issued.account_id, issued.api_key


async def create_key(conn: Conn, *, account_id: str, mode: str) -> IssuedKey | None:
    """Another key for an existing account, or None if there is no such account."""
    if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id) is None:
        return None
    return await _insert_key(conn, account_id, mode)


async def list_keys(conn: Conn, account_id: str) -> list[KeyInfo] | None:
    """The account's keys, oldest first, revoked ones included; None if there is no such
    account."""
    if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id) is None:
        return None
    rows = await conn.fetch(
        """SELECT id, mode, created_at, revoked_at FROM api_keys
           WHERE account_id = $1 ORDER BY created_at, id""",
        account_id,
    )
    return [KeyInfo(r["id"], r["mode"], r["created_at"], r["revoked_at"]) for r in rows]


async def revoke_key(conn: Conn, key_id: str) -> KeyInfo | None:
    """Revoke a key (from now on every request with it is 401); None if there is no such key.

    Revoking a key already revoked changes nothing and returns it as it is.
    """
    row = await conn.fetchrow(
        """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
           RETURNING id, mode, created_at, revoked_at""",
        key_id,
    )
    if row is None:
        return None
    return KeyInfo(row["id"], row["mode"], row["created_at"], row["revoked_at"])


async def authenticate(conn: Conn, api_key: str) -> Principal | None:
    """The principal a presented key speaks for, or None for an unknown or revoked key.

    The row is found by the key's hash; the hash is then compared again in constant time so
    no code path depends on a byte-by-byte comparison of secret material.
    """
    if not api_key.startswith(KEY_PREFIXES) or not api_key.isascii():
        return None
    row = await conn.fetchrow(
        """SELECT k.id, k.account_id, k.mode, k.key_hash, a.plan
           FROM api_keys k JOIN accounts a ON a.id = k.account_id
           WHERE k.key_hash = $1 AND k.revoked_at IS NULL""",
        hash_api_key(api_key),
    )
    if row is None or not key_matches(api_key, row["key_hash"]):
        return None
    return Principal(
        key_id=row["id"], account_id=row["account_id"], plan=row["plan"], mode=row["mode"]
    )

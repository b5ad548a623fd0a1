"""`cargolint-webhooks migrate`: create the database if missing, apply migrations in order.

Each migration runs in its own transaction and is recorded in `schema_migrations`; an advisory
lock makes two migrators started at once take turns, so running it twice is safe.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from engine.core.crypto import SecretBox

__all__ = ["create_database_if_missing", "migrate", "migration_files", "reseal_secrets"]

log = logging.getLogger(__name__)
_LOCK_ID = 0x6361_7267_6F6C  # "cargol"


def migration_files() -> list[tuple[str, str]]:
    """(name, SQL) of every migration, in order."""
    folder = resources.files("engine.store") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def create_database_if_missing(dsn: str) -> bool:
    """Create the database the DSN names, connecting to `postgres` to do it. True if created."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        return False
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        # Identifiers cannot be bound as parameters; quote_ident makes the name safe.
        quoted = await admin.fetchval("SELECT quote_ident($1)", name)
        await admin.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("created database", extra={"database": name})
    return True


async def migrate(dsn: str, *, secret_keys: tuple[str, ...] = ()) -> list[str]:
    """Apply pending migrations and return the names applied."""
    await create_database_if_missing(dsn)
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       name text PRIMARY KEY,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
                log.info("applied migration", extra={"migration": name})
            await reseal_secrets(conn, SecretBox(secret_keys))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied


async def reseal_secrets(conn: asyncpg.Connection[Any], box: SecretBox) -> int:
    """Encrypt plain-text secrets and re-encrypt old-key ones with the first key.

    Both the current secret and the previous one a rotation keeps for its overlap.
    """
    if not box.encrypting:
        return 0
    count = 0
    async with conn.transaction():
        rows = await conn.fetch("SELECT id, secret, previous_secret FROM webhooks FOR UPDATE")
        for row in rows:
            for column in ("secret", "previous_secret"):
                sealed = row[column]
                if sealed is not None and box.needs_reseal(sealed):
                    await conn.execute(
                        f"UPDATE webhooks SET {column} = $2 WHERE id = $1",
                        row["id"],
                        box.reseal(sealed),
                    )
                    count += 1
    if count:
        log.info("re-encrypted webhook secrets", extra={"count": count})
    return count

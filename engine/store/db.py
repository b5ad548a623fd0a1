"""Connection pools and the database's own name handling."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import orjson

__all__ = ["NOTIFY_CHANNEL", "Conn", "TxConn", "connect", "create_pool"]

# Strings: asyncpg's classes are generic only to the type checker.
# One connection, its own or the pool's: what a transaction is opened on.
TxConn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"
# What a single statement runs on: one connection, or the pool (which lends one for it).
Conn: TypeAlias = "TxConn | asyncpg.Pool[Any]"

# Every change to a webhook is announced here; the payload is the webhook id.
NOTIFY_CHANNEL = "cargolint_webhooks"


async def _init(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Release without the reset query (`RESET ALL`, `UNLISTEN *`, … one round trip each time).

    Nothing run on a pooled connection changes session state: LISTEN and the migrator's
    advisory lock use connections of their own. asyncpg still rolls back an open transaction.
    """


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool[Any]:
    """A pool with our codecs; the caller closes it."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init,
        reset=_keep_session,
        command_timeout=30,
    )
    assert pool is not None  # noqa: S101 - create_pool returns None only when awaited twice
    return pool


async def connect(dsn: str) -> asyncpg.Connection[Any]:
    """One connection with our codecs (for LISTEN, which needs a dedicated connection)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, command_timeout=30)
    await _init(conn)
    return conn

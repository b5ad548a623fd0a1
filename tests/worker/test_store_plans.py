"""The worker's updates by delivery id find their rows by primary key, however many ended
deliveries the pending-only indexes still list (their entries stay until a vacuum)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import pytest

from engine.store.deliveries import AttemptRecord, record_attempts
from engine.store.queue import end_deliveries, park_deliveries, retake_due

# A string: asyncpg's classes are generic only to the type checker.
Statement: TypeAlias = "Callable[[asyncpg.Connection[Any], list[str]], Awaitable[object]]"


async def _record(conn: asyncpg.Connection[Any], ids: list[str]) -> None:
    now = datetime.now(UTC)
    await record_attempts(
        conn,
        [AttemptRecord(i, 1, now, 200, 5, None, None, "ok", "succeeded", None) for i in ids],
    )


async def _park(conn: asyncpg.Connection[Any], ids: list[str]) -> None:
    await park_deliveries(conn, ids, [datetime.now(UTC)] * len(ids))


async def _end(conn: asyncpg.Connection[Any], ids: list[str]) -> None:
    await end_deliveries(conn, ids, error="gone")


async def _retake(conn: asyncpg.Connection[Any], ids: list[str]) -> None:
    await retake_due(conn, "wrk_plan", ids, lease=15.0)


@pytest.mark.parametrize("statement", [_record, _park, _end, _retake])
async def test_updates_by_id_use_the_primary_key(
    pool: asyncpg.Pool[Any], statement: Statement
) -> None:
    tag = secrets.token_hex(4)
    # Ended deliveries, each first inserted pending: dead entries in the pending-only indexes.
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type,
                                   next_attempt_at, claimed_by)
           SELECT 'dlv_plan_' || $1 || g, 'wh_plan', 'acct_plan', 'evt_' || g, 't', now(), 'w'
           FROM generate_series(1, 5000) g""",
        tag,
    )
    await pool.execute(
        "UPDATE deliveries SET status = 'succeeded' WHERE id LIKE 'dlv_plan_' || $1 || '%'", tag
    )
    await pool.execute("ANALYZE deliveries")
    ids = [f"dlv_plan_{tag}{g}" for g in range(1, 21)]

    queries: list[tuple[str, Any]] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda q: queries.append((q.query, q.args)))
        await statement(conn, ids)
        await asyncio.sleep(0)  # query loggers are called soon after, not during
        (query, args) = next(q for q in queries if "UPDATE deliveries" in q[0])
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))
    assert "deliveries_pkey" in plan, plan
    assert "deliveries_pending_by_webhook" not in plan, plan
    assert "deliveries_due" not in plan, plan

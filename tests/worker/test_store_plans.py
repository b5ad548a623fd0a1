"""The worker's updates by delivery id find their rows by primary key, however many ended
deliveries the pending-only indexes still list (their entries stay until a vacuum); its
heartbeat's scans of claims read the claimed deliveries only, however long the backlog."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

from engine.store.deliveries import AttemptRecord, Conn, record_attempts
from engine.store.queue import (
    end_deliveries,
    own_stale,
    park_deliveries,
    release_lapsed,
    retake_due,
)
from tests.worker.helpers import insert_pending

Statement: TypeAlias = Callable[[Conn, list[str]], Awaitable[object]]


async def _record(conn: Conn, ids: list[str]) -> None:
    now = datetime.now(UTC)
    await record_attempts(
        conn,
        [AttemptRecord(i, 1, now, 200, 5, None, None, "ok", "succeeded", None) for i in ids],
    )


async def _park(conn: Conn, ids: list[str]) -> None:
    await park_deliveries(conn, ids, [datetime.now(UTC)] * len(ids))


async def _end(conn: Conn, ids: list[str]) -> None:
    await end_deliveries(conn, ids, error="gone")


async def _retake(conn: Conn, ids: list[str]) -> None:
    await retake_due(conn, "wrk_plan", ids, lease=15.0)


async def _plan(
    pool: asyncpg.Pool[Any], run: Callable[[Conn], Awaitable[object]], sent: str
) -> str:
    """Run a statement of the store, then EXPLAIN the first query it sent containing `sent`."""
    queries: list[tuple[str, Any]] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda q: queries.append((q.query, q.args)))
        await run(conn)
        await asyncio.sleep(0)  # query loggers are called soon after, not during
        (query, args) = next(q for q in queries if sent in q[0])
        return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))


@pytest.mark.parametrize("statement", [_record, _park, _end, _retake])
async def test_updates_by_id_use_the_primary_key(
    pool: asyncpg.Pool[Any], statement: Statement
) -> None:
    tag = secrets.token_hex(4)
    # Ended deliveries, each first inserted pending: dead entries in the pending-only indexes.
    await insert_pending(
        pool, f"dlv_plan_{tag}", 5000, webhook_id="wh_plan", account_id="acct_plan", claimed_by="w"
    )
    await pool.execute(
        "UPDATE deliveries SET status = 'succeeded' WHERE id LIKE 'dlv_plan_' || $1 || '%'", tag
    )
    await pool.execute("ANALYZE deliveries")
    ids = [f"dlv_plan_{tag}{g}" for g in range(1, 21)]

    plan = await _plan(pool, lambda conn: statement(conn, ids), "UPDATE deliveries")
    assert "deliveries_pkey" in plan, plan
    assert "deliveries_pending_by_webhook" not in plan, plan
    assert "deliveries_due" not in plan, plan


async def _release_lapsed(conn: Conn) -> None:
    await release_lapsed(conn, "wrk_plan", lease=15.0)


async def _own_stale(conn: Conn) -> None:
    await own_stale(conn, "wrk_plan", overdue=15.0)


@pytest.mark.parametrize("statement", [_release_lapsed, _own_stale])
async def test_the_heartbeats_scans_of_claims_read_only_claimed_deliveries(
    pool: asyncpg.Pool[Any], statement: Callable[[Conn], Awaitable[None]]
) -> None:
    # A dead endpoint's backlog: pending, waiting for later retries, claimed by nobody. Every
    # beat of every worker read all of it before (a sequential scan: 120 to 530 ms a million).
    tag = secrets.token_hex(4)
    await insert_pending(
        pool,
        f"dlv_backlog_{tag}",
        20000,
        webhook_id="wh_dead",
        account_id="acct_plan",
        due_in=timedelta(hours=1),
    )
    await pool.execute("ANALYZE deliveries")
    plan = await _plan(pool, statement, "deliveries")
    assert "deliveries_claimed" in plan, plan
    assert "Seq Scan on deliveries" not in plan, plan


async def test_a_full_batch_is_expected_to_find_its_rows_after_an_analyze_saw_only_ended_ones(
    pool: asyncpg.Pool[Any],
) -> None:
    # The recorder's batches reach 1,000 and more. From statistics taken while every delivery
    # had ended, "still pending" matched one row, and the planner was free to join the batch
    # to a scan of the whole table by a nested loop comparing every row with every row (seen
    # in the benchmark: 0.4 to 1.0 s a batch). It must expect the batch's rows to be there.
    tag = secrets.token_hex(4)
    await insert_pending(
        pool, f"dlv_done_{tag}", 20000, webhook_id="wh_plan", account_id="acct_plan"
    )
    await pool.execute(
        "UPDATE deliveries SET status = 'succeeded' WHERE id LIKE 'dlv_done_' || $1 || '%'", tag
    )
    await pool.execute("VACUUM ANALYZE deliveries")
    await insert_pending(
        pool, f"dlv_new_{tag}", 1000, webhook_id="wh_plan", account_id="acct_plan", claimed_by="w"
    )
    ids = [f"dlv_new_{tag}{g}" for g in range(1, 1001)]

    plan = await _plan(pool, lambda conn: _record(conn, ids), "UPDATE deliveries")
    ended = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE id = ANY($1::text[]) AND status = 'succeeded'",
        ids,
    )
    # The estimate above depends on what else the shared test database holds (other tests'
    # pending rows sway the statistics); this does not: the column has none.
    kept = await pool.fetchval(
        "SELECT count(*) FROM pg_stats WHERE tablename = 'deliveries' AND attname = 'status'"
    )
    assert kept == 0
    join = re.search(r"->  (?:Hash Join|Nested Loop|Merge Join)  \(.* rows=(\d+) ", plan)
    assert join is not None, plan
    assert int(join.group(1)) >= 500, plan
    assert ended == 1000

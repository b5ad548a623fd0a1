"""The worker's updates by delivery id find their rows by primary key, however many ended
deliveries the pending-only indexes still list (their entries stay until a vacuum); its
heartbeat's scans of claims read the claimed deliveries only, however long the backlog; a batch
costs the store work in proportion to the batch, whatever statistics the planner has.

The work is what the statement did, counted by `EXPLAIN ANALYZE`: the rows each step of its
plan produced or filtered out, never the planner's estimates, which depend on whatever else the
shared test database holds."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from asyncpg.pool import PoolConnectionProxy

from engine.store.db import Conn
from engine.store.deliveries import AttemptRecord, record_attempts
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


async def _sent(
    conn: PoolConnectionProxy[Any], run: Callable[[Conn], Awaitable[object]], sent: str
) -> tuple[str, Any]:
    """The first query containing `sent` that a statement of the store sends (run and rolled
    back), with its arguments."""
    queries: list[tuple[str, Any]] = []
    conn.add_query_logger(lambda q: queries.append((q.query, q.args)))
    transaction = conn.transaction()
    await transaction.start()
    try:
        await run(conn)
        await asyncio.sleep(0)  # query loggers are called soon after, not during
    finally:
        await transaction.rollback()
    return next(q for q in queries if sent in q[0])


async def _plan(
    pool: asyncpg.Pool[Any], run: Callable[[Conn], Awaitable[object]], sent: str
) -> str:
    """EXPLAIN the first query containing `sent` that a statement of the store sends."""
    async with pool.acquire() as conn:
        query, args = await _sent(conn, run, sent)
        return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


async def _work(
    pool: asyncpg.Pool[Any], run: Callable[[Conn], Awaitable[object]], sent: str
) -> tuple[int, str]:
    """Run the first query containing `sent` that a statement of the store sends, once, under
    EXPLAIN ANALYZE: the rows its plan's steps produced or filtered out, and the plan."""
    async with pool.acquire() as conn:
        query, args = await _sent(conn, run, sent)
        explained = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args)
    plan = orjson.loads(explained)[0]["Plan"]
    rows = sum(
        sum(node.get(key, 0) for key in _ROWS) * node.get("Actual Loops", 1)
        for node in _nodes(plan)
    )
    return int(rows), orjson.dumps(plan, option=orjson.OPT_INDENT_2).decode()


_ROWS = (
    "Actual Rows",
    "Rows Removed by Filter",
    "Rows Removed by Join Filter",
    "Rows Removed by Index Recheck",
)


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
    claimed = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE status = 'pending' AND claimed_by IS NOT NULL"
    )
    # A few steps for each claimed delivery (find, check its worker, release), no more.
    bound = 10 * claimed + 100
    assert bound < 20000, "the test's backlog must outweigh the claims"
    rows, plan = await _work(pool, statement, "deliveries")
    assert rows <= bound, plan


@pytest.mark.slow
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

    table = await pool.fetchval("SELECT count(*) FROM deliveries")
    # One pass over the table at most and a few steps per row of the batch; the loop that
    # compares every row of the batch with every pending row does a million and more.
    bound = table + 100 * len(ids)
    assert bound < len(ids) ** 2, "the table must not outweigh the batch's own rows"
    rows, plan = await _work(pool, lambda conn: _record(conn, ids), "UPDATE deliveries")
    assert rows <= bound, plan
    ended = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE id = ANY($1::text[]) AND status = 'succeeded'",
        ids,
    )
    assert ended == 1000

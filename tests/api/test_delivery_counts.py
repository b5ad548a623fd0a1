"""Deep pages found from the per-hour counts (engine/store/delivery_counts.py) are the pages
OFFSET reads, also after late status changes, deliveries dated back and purges, before and
after their changes are folded in."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from engine.store.db import connect
from engine.store.deliveries import COUNTED_FROM, DeliveryFilter, list_deliveries
from engine.store.delivery_counts import count_hours, fold_changes
from engine.store.retention import purge_batch

FILTERS = [
    DeliveryFilter(),
    DeliveryFilter(status="failed"),
    DeliveryFilter(event_type="compliance.warning"),
    DeliveryFilter(status="succeeded", event_type="document.uploaded"),
]
OLD = 30_000  # a thousand an hour, from 34 hours ago to 4 hours ago
HEAD = 1_500  # the last hour: not counted yet


async def _by_offset(
    pool: asyncpg.Pool[Any], webhook_id: str, filters: DeliveryFilter, offset: int
) -> list[str]:
    rows = await pool.fetch(
        """SELECT id FROM deliveries
           WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2)
             AND ($3::text IS NULL OR event_type = $3)
           ORDER BY created_at DESC, id DESC OFFSET $4 LIMIT 20""",
        webhook_id,
        filters.status,
        filters.event_type,
        offset,
    )
    return [r["id"] for r in rows]


async def _check(pool: asyncpg.Pool[Any], webhook_id: str) -> None:
    for filters in FILTERS:
        matching: int = await pool.fetchval(
            """SELECT count(*) FROM deliveries WHERE webhook_id = $1
               AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR event_type = $3)""",
            webhook_id,
            filters.status,
            filters.event_type,
        )
        for offset in (COUNTED_FROM, COUNTED_FROM + 777, matching - 25, matching + 5):
            if offset < COUNTED_FROM:
                continue
            async with pool.acquire() as conn:
                rows, total = await list_deliveries(
                    conn, webhook_id, filters, offset=offset, limit=20
                )
            assert [r["id"] for r in rows] == await _by_offset(pool, webhook_id, filters, offset)
            assert total == matching, (filters, offset)


@pytest.fixture
async def counted(pool: asyncpg.Pool[Any], database_url: str) -> str:
    webhook_id = f"wh_cnt{secrets.token_hex(6)}"
    tag = secrets.token_hex(3)
    await pool.execute(
        "INSERT INTO accounts (id, name, plan) VALUES ($1, 'counts', 'business')", f"acct_{tag}"
    )
    await pool.execute(
        """INSERT INTO webhooks (id, account_id, mode, url, events, secret)
           VALUES ($1, $2, 'live', 'https://example.com/hook', '{document.uploaded}', 'plain:x')""",
        webhook_id,
        f"acct_{tag}",
    )
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status,
                                   created_at)
           SELECT 'dlv_c' || $2 || g, $1, 'acct_cnt', 'evt_' || $2 || g,
                  (ARRAY['document.uploaded', 'compliance.warning'])[1 + g % 2],
                  CASE WHEN g % 5 = 0 THEN 'failed' ELSE 'succeeded' END,
                  CASE WHEN g <= $4 THEN now() - interval '15 minutes' - g * interval '2 seconds'
                       ELSE now() - interval '4 hours' - (g - $4) * interval '3.6 seconds' END
           FROM generate_series(1, $3) g""",
        webhook_id,
        tag,
        OLD + HEAD,
        HEAD,
    )
    conn = await connect(database_url)
    try:
        assert await count_hours(conn, datetime.now(UTC), at_least=1_000) >= 1
    finally:
        await conn.close()
    return webhook_id


@pytest.mark.slow
async def test_deep_pages_from_the_counts_are_the_pages_offset_reads(
    pool: asyncpg.Pool[Any], counted: str, database_url: str
) -> None:
    await _check(pool, counted)
    # Late changes to counted hours: statuses (a late retry, a resend), a delivery dated back.
    await pool.execute(
        """UPDATE deliveries SET status = 'failed'
           WHERE webhook_id = $1 AND status = 'succeeded'
             AND created_at < now() - interval '20 hours' AND random() < 0.05""",
        counted,
    )
    await pool.execute(
        """UPDATE deliveries SET created_at = now() - interval '30 hours'
           WHERE id IN (SELECT id FROM deliveries WHERE webhook_id = $1
                        ORDER BY created_at DESC LIMIT 10)""",
        counted,
    )
    await _check(pool, counted)
    conn = await connect(database_url)
    try:
        cutoff = await pool.fetchval("SELECT now() - interval '25 hours'")
        while (await purge_batch(conn, cutoff, 2_000)).deliveries:
            pass
        await _check(pool, counted)
        assert await fold_changes(conn) > 0
        assert await pool.fetchval("SELECT count(*) FROM delivery_count_changes") == 0
    finally:
        await conn.close()
    await _check(pool, counted)

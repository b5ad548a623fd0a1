"""The delivery list at depth: `total` exact up to 10,000 and never below it beyond, and pages
found by their first row's key (from offset 1,000) equal to what OFFSET reads."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import pytest

from engine.store.deliveries import (
    ANCHORED_FROM,
    EXACT_TOTAL,
    DeliveryFilter,
    list_deliveries,
)
from tests.api.conftest import Account, Client


async def _history(pool: asyncpg.Pool[Any], webhook_id: str, count: int) -> None:
    """`count` finished deliveries, one a second back from now, some failed, three types; a
    run of them shares one created_at, so pages must order ties by id."""
    tag = secrets.token_hex(4)
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status,
                                   created_at)
           SELECT 'dlv_d' || $2 || g, $1, 'acct_depth', 'evt_' || g,
                  (ARRAY['document.uploaded', 'compliance.warning',
                         'document.batch_downloaded'])[1 + g % 3],
                  CASE WHEN g % 7 = 0 THEN 'failed' ELSE 'succeeded' END,
                  date_trunc('second', now()) - (g / 4) * interval '1 second'
           FROM generate_series(1, $3) g""",
        webhook_id,
        tag,
        count,
    )


async def _by_offset(
    pool: asyncpg.Pool[Any], webhook_id: str, filters: DeliveryFilter, offset: int, limit: int
) -> list[str]:
    """The page as plain OFFSET reads it (the reference)."""
    args: list[Any] = [webhook_id, filters.status, filters.event_type, offset, limit]
    rows = await pool.fetch(
        """SELECT id FROM deliveries
           WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2)
             AND ($3::text IS NULL OR event_type = $3)
           ORDER BY created_at DESC, id DESC OFFSET $4 LIMIT $5""",
        *args,
    )
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
async def deep(pool: asyncpg.Pool[Any]) -> str:
    webhook_id = f"wh_depth{secrets.token_hex(6)}"
    await _history(pool, webhook_id, EXACT_TOTAL + 2_000)
    await pool.execute("ANALYZE deliveries")
    return webhook_id


@pytest.mark.parametrize(
    "filters",
    [
        DeliveryFilter(),
        DeliveryFilter(status="failed"),
        DeliveryFilter(event_type="document.uploaded"),
        DeliveryFilter(status="succeeded", event_type="compliance.warning"),
    ],
)
@pytest.mark.parametrize("offset", [0, ANCHORED_FROM - 3, ANCHORED_FROM, 3_333, 11_990, 20_000])
async def test_pages_at_any_offset_are_those_offset_reads(
    pool: asyncpg.Pool[Any], deep: str, filters: DeliveryFilter, offset: int
) -> None:
    async with pool.acquire() as conn:
        rows, _ = await list_deliveries(conn, deep, filters, offset=offset, limit=20)
    assert [r["id"] for r in rows] == await _by_offset(pool, deep, filters, offset, 20)


async def test_total_is_exact_up_to_the_limit_and_never_below_it_beyond(
    pool: asyncpg.Pool[Any], deep: str
) -> None:
    async with pool.acquire() as conn:
        _, everything = await list_deliveries(conn, deep, DeliveryFilter(), offset=0, limit=5)
        _, failed = await list_deliveries(
            conn, deep, DeliveryFilter(status="failed"), offset=0, limit=5
        )
        _, far = await list_deliveries(conn, deep, DeliveryFilter(), offset=11_995, limit=20)
    assert everything > EXACT_TOTAL
    assert failed == (EXACT_TOTAL + 2_000) // 7  # 1,714: exact
    assert far >= 12_000  # at least the rows up to the page read


async def test_an_exact_total_just_below_the_limit(
    pool: asyncpg.Pool[Any], client: Client, account: Account
) -> None:
    hook = (await client.create("https://example.com/hook"))["id"]
    await _history(pool, hook, EXACT_TOTAL)
    status, body, _ = await client.call(
        "GET", f"/api/v1/webhooks/{hook}/deliveries", params={"offset": "9990", "limit": "20"}
    )
    assert status == 200, body
    assert body["total"] == EXACT_TOTAL
    assert len(body["data"]) == 10
    assert body["data"][-1]["id"] == (await _by_offset(pool, hook, DeliveryFilter(), 9999, 1))[0]

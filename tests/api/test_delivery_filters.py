"""GET /webhooks/{id}/deliveries?status=&event=: filters, totals, errors and query plans."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import pytest

from engine.store.deliveries import DeliveryFilter, list_deliveries
from tests.api.conftest import Account, Client
from tests.api.deliveries import add_delivery
from tests.api.test_webhooks import HOOK, assert_error


@pytest.fixture
async def history(client: Client, account: Account, pool: asyncpg.Pool[Any]) -> dict[str, Any]:
    """A webhook with deliveries of every (status, event type) pair, newest last in `ids`."""
    webhook = await client.create(HOOK, ["document.uploaded", "compliance.warning"])
    ids: list[tuple[str, str, str]] = []
    for event_type in ("document.uploaded", "compliance.warning"):
        for status in ("pending", "succeeded", "failed", "failed"):
            dlv = await add_delivery(
                pool,
                webhook["id"],
                account.id,
                event_type=event_type,
                status=status,
                attempts=0 if status == "pending" else 1,
            )
            ids.append((dlv, status, event_type))
    return {"webhook": webhook, "ids": ids}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"status": "failed"},
        {"status": "pending"},
        {"event": "compliance.warning"},
        {"event": "document.batch_downloaded"},
        {"status": "failed", "event": "document.uploaded"},
        {"status": "succeeded", "event": "compliance.warning", "limit": "1"},
        {"status": "failed", "offset": "1", "limit": "2"},
    ],
)
async def test_filters_narrow_the_list_and_its_total(
    client: Client, history: dict[str, Any], params: dict[str, str]
) -> None:
    wanted = [
        dlv
        for dlv, status, event_type in reversed(history["ids"])
        if params.get("status", status) == status and params.get("event", event_type) == event_type
    ]
    offset, limit = int(params.get("offset", "0")), int(params.get("limit", "20"))
    status, page, _ = await client.call(
        "GET", f"/api/v1/webhooks/{history['webhook']['id']}/deliveries", params=params
    )
    assert status == 200, page
    assert [d["id"] for d in page["data"]] == wanted[offset : offset + limit]
    assert (page["offset"], page["limit"], page["total"]) == (offset, limit, len(wanted))
    for record in page["data"]:
        assert record["status"] == params.get("status", record["status"])
        assert record["event"] == params.get("event", record["event"])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=", "status"),
        ("status=done", "status"),
        ("status=FAILED", "status"),
        ("status=failed&status=failed", "status"),
        ("status=failed%20", "status"),
        ("event=", "event"),
        ("event=document", "event"),
        ("event=document.uploaded&event=compliance.warning", "event"),
        ("status=failed&event=nope", "event"),
        ("status=nope&event=document.uploaded", "status"),
    ],
)
async def test_a_bad_filter_is_400_invalid_value_naming_it(
    client: Client, query: str, field: str
) -> None:
    webhook = await client.create(HOOK)
    status, body, _ = await client.call(
        "GET", f"/api/v1/webhooks/{webhook['id']}/deliveries?{query}"
    )
    assert status == 400
    assert_error(body, "invalid_value", field)


async def test_a_bad_filter_on_someone_elses_webhook_is_still_400(client: Client) -> None:
    # Input is checked before the webhook is looked up (the documented order of checks).
    status, body, _ = await client.call(
        "GET", "/api/v1/webhooks/wh_000000000000/deliveries", params={"status": "x"}
    )
    assert status == 400
    assert_error(body, "invalid_value", "status")


async def _plan(pool: asyncpg.Pool[Any], webhook_id: str, filters: DeliveryFilter) -> str:
    """EXPLAIN the page query the store sends for these filters."""
    queries: list[tuple[str, Any]] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda q: queries.append((q.query, q.args)))
        await list_deliveries(conn, webhook_id, filters, offset=0, limit=20)
        await asyncio.sleep(0)  # query loggers are called soon after, not during
        query, args = next(q for q in queries if "ORDER BY" in q[0])
        return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        (DeliveryFilter(status="failed"), "deliveries_by_status"),
        (DeliveryFilter(event_type="compliance.warning"), "deliveries_by_event"),
        (DeliveryFilter(), "deliveries_by_webhook"),
    ],
)
async def test_a_filtered_page_is_read_in_index_order(
    pool: asyncpg.Pool[Any], filters: DeliveryFilter, index: str
) -> None:
    # A webhook with a long history, mostly succeeded and of one type: the page's rows are rare,
    # and without an index on the filtered column Postgres would read and sort the history.
    tag = secrets.token_hex(4)
    webhook_id = f"wh_plan{tag}"
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status,
                                   created_at)
           SELECT 'dlv_f' || $2 || g, $1, 'acct_plan', 'evt_' || g,
                  CASE WHEN g % 50 = 0 THEN 'compliance.warning' ELSE 'document.uploaded' END,
                  CASE WHEN g % 40 = 0 THEN 'failed' ELSE 'succeeded' END,
                  now() - g * interval '1 second'
           FROM generate_series(1, 30000) g""",
        webhook_id,
        tag,
    )
    await pool.execute("ANALYZE deliveries")
    plan = await _plan(pool, webhook_id, filters)
    assert index in plan, plan
    assert "Sort" not in plan, plan
    assert "Seq Scan" not in plan, plan

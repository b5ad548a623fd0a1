"""Resent and recovered deliveries (docs/contract.md §6): back to `pending` with a fresh retry
schedule, the same delivery id and payload, attempted by the worker like any retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from engine.settings import Settings
from engine.store import resending
from engine.worker.main import Worker
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    eventually,
    make_event,
    publish_one,
    subscribed,
    wait_final,
)


async def resend(
    pool: asyncpg.Pool[Any], account_id: str, webhook_id: str, delivery_id: str
) -> None:
    """Resend one finished delivery as the API's `…/retry` does."""
    async with pool.acquire() as conn:
        resent = await resending.resend(
            conn,
            account_id=account_id,
            mode="live",
            webhook_id=webhook_id,
            delivery_id=delivery_id,
        )
    assert isinstance(resent, resending.Resent), resent


async def _numbers(pool: asyncpg.Pool[Any], delivery_id: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT number FROM delivery_attempts WHERE delivery_id = $1 ORDER BY number",
        delivery_id,
    )
    return [r["number"] for r in rows]


async def test_a_resent_failed_delivery_gets_the_whole_schedule_again(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    async def broken(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=500)

    receiver.handler = broken
    one = await publish_one(worker, pool, wsettings, publisher, receiver.url)
    account, webhook_id, delivery_id = one.account, one.webhook_id, one.id
    per_schedule = len(wsettings.retry_schedule) + 1
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert (row["status"], row["attempts"]) == ("failed", per_schedule)

    await resend(pool, account, webhook_id, delivery_id)
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    # Counted from where the resend started the schedule, not from the first attempt: without
    # retry_base the fourth attempt would have been past the schedule's end, and the last.
    assert (row["status"], row["attempts"]) == ("failed", 2 * per_schedule)
    assert row["retry_base"] == per_schedule
    assert await _numbers(pool, delivery_id) == list(range(1, 2 * per_schedule + 1))
    got = await receiver.wait_for(2 * per_schedule)
    assert len(got) == 2 * per_schedule
    assert {r.headers["X-CargoLint-Delivery"] for r in got} == {delivery_id}
    assert len({r.body for r in got}) == 1
    # The fresh schedule's first wait came before the resent delivery's second attempt.
    first, second = got[per_schedule], got[per_schedule + 1]
    assert second.at - first.at >= wsettings.retry_schedule[0]


async def test_a_resent_delivery_that_succeeds_ends_succeeded(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    one = await publish_one(worker, pool, wsettings, publisher, receiver.url)
    account, webhook_id, delivery_id = one.account, one.webhook_id, one.id
    await wait_final(pool, [delivery_id])

    await resend(pool, account, webhook_id, delivery_id)
    await receiver.wait_for(2)
    await eventually(
        lambda: _final(pool, delivery_id, "succeeded", attempts=2), timeout=10.0, every=0.05
    )
    [first, again] = receiver.requests
    assert first.body == again.body
    assert first.headers["X-CargoLint-Delivery"] == again.headers["X-CargoLint-Delivery"]
    assert await _numbers(pool, delivery_id) == [1, 2]


async def _final(pool: asyncpg.Pool[Any], delivery_id: str, status: str, *, attempts: int) -> bool:
    row = await pool.fetchrow("SELECT status, attempts FROM deliveries WHERE id = $1", delivery_id)
    return row is not None and (row["status"], row["attempts"]) == (status, attempts)


async def test_recovered_deliveries_are_all_delivered_again(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    down = True

    async def outage(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=503 if down else 200)

    receiver.handler = outage
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    events = [make_event(account) for _ in range(30)]
    await publisher.publish_many(events)
    ids = [dlv(webhook_id, account, e) for e in events]
    rows = await wait_final(pool, ids)
    assert {r["status"] for r in rows.values()} == {"failed"}

    down = False
    async with pool.acquire() as conn:
        recovered = await resending.recover(
            conn,
            account_id=account,
            mode="live",
            webhook_id=webhook_id,
            since=datetime.now(UTC) - timedelta(hours=1),
            until=None,
            rate=wsettings.endpoint_rate,
        )
    assert recovered == len(ids)
    rows = await wait_final(pool, ids)
    per_schedule = len(wsettings.retry_schedule) + 1
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {
        ("succeeded", per_schedule + 1)
    }
    delivered = {r.headers["X-CargoLint-Delivery"] for r in receiver.requests[-len(ids) :]}
    assert delivered == set(ids)

"""Who gets what: fan-out, isolation, inactive and deleted webhooks, changes within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from engine.core.events import parse_event
from engine.core.ids import delivery_id as make_id
from engine.settings import Settings
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from engine.worker.main import Worker
from engine.worker.recorder import GONE
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    cached,
    deactivate_webhook,
    dlv,
    make_account,
    make_event,
    make_webhook,
    publish_one,
    remove_webhook,
    statuses,
    wait_final,
)


async def test_fan_out_and_isolation(
    worker: Worker,
    publisher: Publisher,
    make_receiver: Callable[..., Any],
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    """Three webhooks of one account get the event; other accounts, modes and types do not."""
    account, other = await make_account(pool), await make_account(pool)
    hits = [await make_receiver() for _ in range(3)]
    miss = await make_receiver()
    subscribed = [(await make_webhook(pool, wsettings, account, r.url))[0] for r in hits]
    unsubscribed = [
        (await make_webhook(pool, wsettings, other, miss.url))[0],  # another account
        (await make_webhook(pool, wsettings, account, miss.url, mode="test"))[0],  # test mode
        (await make_webhook(pool, wsettings, account, miss.url, events=["compliance.warning"]))[0],
    ]
    await cached(worker, *subscribed, *unsubscribed)

    event = make_event(account, mode=None)  # mode defaults to live
    await publisher.publish(event)
    for receiver in hits:
        (request,) = await receiver.wait_for(1)
        assert orjson.loads(request.body)["data"] == event["data"]
    ids = [dlv(w, account, event) for w in subscribed]
    rows = await wait_final(pool, ids)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert len({r.headers["X-CargoLint-Delivery"] for h in hits for r in h.requests}) == 3
    # A later event for the other account reaches it, proving it was listening all along.
    later = make_event(other)
    await publisher.publish(later)
    (request,) = await miss.wait_for(1)
    assert orjson.loads(request.body)["deliveryId"] == dlv(unsubscribed[0], other, later)
    made = await pool.fetchval("SELECT count(*) FROM deliveries WHERE event_id = $1", event["id"])
    assert made == 3


async def test_inactive_and_deleted_webhooks_get_nothing(
    worker: Worker,
    publisher: Publisher,
    make_receiver: Callable[..., Any],
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account = await make_account(pool)
    live, quiet, gone = await make_receiver(), await make_receiver(), await make_receiver()
    live_id, _ = await make_webhook(pool, wsettings, account, live.url)
    await make_webhook(pool, wsettings, account, quiet.url, active=False)
    gone_id, _ = await make_webhook(pool, wsettings, account, gone.url)
    await cached(worker, live_id, gone_id)
    await remove_webhook(pool, account, gone_id)

    async def dropped() -> None:
        while worker.cache.get(gone_id) is not None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(dropped(), 1.0)
    event = make_event(account)
    await publisher.publish(event)
    await live.wait_for(1)
    await wait_final(pool, [dlv(live_id, account, event)])
    assert quiet.requests == [] and gone.requests == []
    assert (
        await pool.fetchval("SELECT count(*) FROM deliveries WHERE event_id = $1", event["id"]) == 1
    )


@pytest.mark.slow
async def test_pending_retries_stop_when_the_webhook_goes(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    """A delivery waiting to retry ends `failed` once its webhook is deactivated."""

    async def broken(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "2"})

    receiver.handler = broken
    one = await publish_one(worker, pool, wsettings, publisher, receiver.url)
    await receiver.wait_for(1)
    await deactivate_webhook(pool, one.account, one.webhook_id)
    row = (await wait_final(pool, [one.id], timeout=5))[one.id]
    assert row["status"] == "failed"
    await asyncio.sleep(2.5)  # past the Retry-After: no second attempt comes
    assert len(receiver.requests) == 1


async def test_claimed_delivery_of_a_deleted_webhook_ends_without_a_request(
    worker: Worker,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    """The dispatcher checks the cache before every attempt (here: a due row, webhook gone)."""

    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    # Soft-delete behind the API's back, so the row stays pending for the worker to find.
    await cached(worker, webhook_id)
    await pool.execute("UPDATE webhooks SET deleted_at = now() WHERE id = $1", webhook_id)
    await pool.execute("SELECT pg_notify('cargolint_webhooks', $1)", webhook_id)

    async def dropped() -> None:
        while worker.cache.get(webhook_id) is not None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(dropped(), 1.0)
    event = parse_event(orjson.dumps(make_event(account)))
    delivery_id = make_id(webhook_id, account, event.id)
    async with pool.acquire() as conn, conn.transaction():
        await insert_events_and_deliveries(
            conn, [event], [NewDelivery(delivery_id, webhook_id, event)], claimed_by=None
        )
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "failed"
    assert row["error"] == GONE
    assert row["attempts"] == 0
    assert receiver.requests == []


async def test_a_new_webhook_gets_the_next_event_a_second_later(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    created = time.monotonic()
    await cached(worker, webhook_id, timeout=1.0)  # the contract's bound on propagation
    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - created)))
    event = make_event(account)
    await publisher.publish(event)
    (request,) = await receiver.wait_for(1)
    assert orjson.loads(request.body)["webhookId"] == webhook_id


async def test_same_event_id_twice_delivers_once(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    one = await publish_one(worker, pool, wsettings, publisher, receiver.url)
    account, webhook_id, event = one.account, one.webhook_id, one.event
    await publisher.publish(event)  # maybe in the same batch
    await receiver.wait_for(1)
    await wait_final(pool, [one.id])
    await publisher.publish(event)  # and certainly in a later one
    marker = make_event(account)
    await publisher.publish(marker)
    await receiver.wait_for(2)
    await wait_final(pool, [dlv(webhook_id, account, marker)])
    ids = [orjson.loads(r.body)["deliveryId"] for r in receiver.requests]
    assert sorted(ids) == sorted([one.id, dlv(webhook_id, account, marker)])
    rows = await statuses(pool, ids)
    assert all(r["attempts"] == 1 for r in rows.values())

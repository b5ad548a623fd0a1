"""Bad messages are dead-lettered with their reason, and valid ones keep flowing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from engine.core.ids import random_token
from engine.settings import Settings
from engine.worker.dead_letters import REASON_HEADER, STORE_REJECTED
from engine.worker.main import Worker
from engine.worker.topology import DEAD_QUEUE
from tests.receiver import Receiver
from tests.worker.conftest import StartWorker
from tests.worker.helpers import (
    Publisher,
    dlv,
    make_account,
    make_event,
    make_webhook,
    subscribed,
    wait_final,
)


async def _dead_letters(
    publisher: Publisher, prefix: str, count: int
) -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
    """Take dead letters (acking each) until `count` whose message id starts with `prefix`
    are found; return those by message id. Others, left by earlier tests, are dropped."""
    assert publisher.channel is not None
    queue = await publisher.channel.declare_queue(DEAD_QUEUE, durable=True)
    found: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
    async with asyncio.timeout(10):
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if (message.message_id or "").startswith(prefix):
                    found[message.message_id or ""] = message
                if len(found) == count:
                    break
    return found


async def test_invalid_messages_are_dead_lettered_while_valid_ones_flow(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    run = random_token(8)

    schema_bad = make_event(account)
    del schema_bad["data"]["document"]["id"]
    unknown = make_event(account)
    unknown["event"] = "document.deleted"
    huge = make_event(account)
    huge["data"]["document"]["fileName"] = "x" * (300 * 1024)
    bad: dict[str, tuple[bytes, str, str]] = {
        "json": (b'{"id": "evt_1", "event": ', "document.uploaded", "invalid_json: "),
        "schema": (
            orjson.dumps(schema_bad),
            "document.uploaded",
            "schema_invalid: data.document: 'id' is a required property",
        ),
        "unknown": (
            orjson.dumps(unknown),
            "document.deleted",
            "unknown_event_type: event 'document.deleted' is not a supported type",
        ),
        "large": (orjson.dumps(huge), "document.uploaded", "too_large: "),
    }
    good = [make_event(account) for _ in range(4)]
    for (name, (body, key, _)), event in zip(bad.items(), good, strict=True):
        await publisher.publish(body, key, message_id=f"{run}-{name}")
        await publisher.publish(event)

    await receiver.wait_for(4)
    await wait_final(pool, [dlv(webhook_id, account, e) for e in good])

    found = await _dead_letters(publisher, f"{run}-", len(bad))
    for name, (body, key, reason) in bad.items():
        message = found[f"{run}-{name}"]
        assert message.body == body  # the original, untouched
        assert message.routing_key == key
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        headers = message.headers or {}
        assert headers["x-upstream"] == "tests"  # original headers kept
        assert str(headers[REASON_HEADER]).startswith(reason), headers[REASON_HEADER]
    # Nothing of the bad ones was recorded as an event.
    bad_ids = [schema_bad["id"], unknown["id"], huge["id"]]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE id = ANY($1)", bad_ids) == 0
    # The worker is still consuming.
    assert worker.consumer.connected
    later = make_event(account)
    await publisher.publish(later)
    await receiver.wait_for(5)


async def test_an_event_id_postgres_cannot_store_is_dead_lettered_not_retried_forever(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # Valid JSON and a string id, but Postgres text cannot hold NUL: accepted, its insert would
    # fail on every redelivery and take the valid messages of its batch down with it.
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    run = random_token(8)
    poison = make_event(account, event_id=f"evt_{run}\x00x")
    good = make_event(account)
    await publisher.publish(orjson.dumps(poison), "document.uploaded", message_id=f"{run}-nul")
    await publisher.publish(good)

    await receiver.wait_for(1)
    await wait_final(pool, [dlv(webhook_id, account, good)])
    message = (await _dead_letters(publisher, f"{run}-nul", 1))[f"{run}-nul"]
    headers = message.headers or {}
    assert str(headers[REASON_HEADER]).startswith("schema_invalid: id: "), headers


async def test_events_postgres_refuses_are_dead_lettered_and_their_batch_flows(
    start_worker: StartWorker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No event the schemas accept is known to be refused by Postgres (NUL and lone surrogates
    # are stopped before), so a peer refuses some: a CHECK on events for this run's prefix.
    # The statement that records a batch fails with CheckViolationError, not an outage.
    run = random_token(8)
    refused_prefix = f"evt_refuse_{run}_"
    constraint = f"test_refuse_{run}"
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    await pool.execute(
        f"ALTER TABLE events ADD CONSTRAINT {constraint} "
        f"CHECK (id NOT LIKE '{refused_prefix}%') NOT VALID"
    )
    try:
        good = [make_event(account) for _ in range(6)]
        bad = [make_event(account, event_id=f"{refused_prefix}{n}") for n in range(2)]
        # Published before the worker starts, so that they reach it together: one batch.
        for n, event in enumerate(good):
            await publisher.publish(event)
            if n in (1, 4):
                poison = bad[n // 3]
                await publisher.publish(
                    orjson.dumps(poison), "document.uploaded", message_id=poison["id"]
                )
        caplog.set_level(logging.WARNING, "engine.worker.intake")
        worker = await start_worker()

        await receiver.wait_for(len(good))
        await wait_final(pool, [dlv(webhook_id, account, e) for e in good])
        found = await _dead_letters(publisher, refused_prefix, len(bad))
        for event in bad:
            message = found[event["id"]]
            assert message.body == orjson.dumps(event)
            assert message.routing_key == "document.uploaded"
            reason = str((message.headers or {})[REASON_HEADER])
            assert reason == (
                f'store_rejected: new row for relation "events" violates check constraint '
                f'"{constraint}"'
            ), reason
        # Nothing of the refused ones was recorded, and nothing is left unacked to come back.
        ids = [e["id"] for e in bad]
        assert await pool.fetchval("SELECT count(*) FROM events WHERE id = ANY($1)", ids) == 0
        assert (
            await pool.fetchval("SELECT count(*) FROM deliveries WHERE event_id = ANY($1)", ids)
            == 0
        )
        dead = worker.metrics.events_dead_lettered.labels(STORE_REJECTED)._value.get()
        assert dead == len(bad)
        accepted = worker.metrics.events_consumed.labels("accepted")._value.get()
        assert accepted == len(good)

        # The good ones were held in the same batches as the refused ones, not apart.
        refusals = [r for r in caplog.records if r.getMessage().startswith("database refused")]
        assert refusals and max(getattr(r, "events", 0) for r in refusals) > 1

        # The worker is still consuming.
        later = make_event(account)
        await publisher.publish(later)
        await receiver.wait_for(len(good) + 1)
    finally:
        await pool.execute(f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {constraint}")

"""CARGOLINT_QUEUE_TYPE against the real broker: quorum queues carry events and dead letters;
a queue that exists as the other type stops start-up with one clear line.

Each test has a vhost of its own: the session's holds the classic queues the other tests use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import pytest

from engine.core.ids import random_token
from engine.settings import Settings
from engine.worker import main
from engine.worker.dead_letters import REASON_HEADER
from engine.worker.topology import DEAD_QUEUE, EXCHANGE, QUEUE, QueueConflictError
from tests.conftest import fresh_vhost, with_
from tests.receiver import Receiver
from tests.worker.conftest import StartWorker
from tests.worker.helpers import dlv, eventually, make_event, subscribed, wait_final

# Each test starts workers against queues it declares, deletes and moves.
pytestmark = pytest.mark.slow


@pytest.fixture
def vhost_url() -> Iterator[str]:
    with fresh_vhost(f"cargolint_test_{random_token(10)}") as url:
        yield url


@pytest.fixture
async def channel(vhost_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A confirming channel on the test's vhost, as an upstream publisher would have."""
    connection = await aio_pika.connect(vhost_url)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


def queues(amqp_url: str) -> dict[str, dict[str, Any]]:
    """The vhost's queues as the broker lists them: name → type, arguments, durable."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
    columns = ["name", "type", "arguments", "durable"]
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--formatter", "json", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {q["name"]: q for q in json.loads(out)}


async def _publish(channel: aio_pika.abc.AbstractChannel, body: bytes, key: str) -> None:
    exchange = await channel.get_exchange(EXCHANGE)
    message = aio_pika.Message(
        body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await exchange.publish(message, routing_key=key)


async def test_quorum_queues_carry_events_and_dead_letters(
    *,
    vhost_url: str,
    start_worker: StartWorker,
    channel: aio_pika.abc.AbstractChannel,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    worker = await start_worker(amqp_url=vhost_url, queue_type="quorum")
    declared = await asyncio.to_thread(queues, vhost_url)
    for name in (QUEUE, DEAD_QUEUE):
        assert declared[name]["type"] == "quorum"
        assert declared[name]["durable"] is True
        assert declared[name]["arguments"] == [["x-queue-type", "longstr", "quorum"]]

    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    events = [make_event(account) for _ in range(20)]
    for event in events:
        await _publish(channel, json.dumps(event).encode(), event["event"])
    await _publish(channel, b"not json", "document.uploaded")
    rows = await wait_final(pool, [dlv(webhook_id, account, e) for e in events])
    assert {r["status"] for r in rows.values()} == {"succeeded"}

    dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
    async with asyncio.timeout(10):
        while (message := await dead.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await message.ack()
    assert message.body == b"not json"
    assert str((message.headers or {})[REASON_HEADER]).startswith("invalid_json")


async def test_a_classic_queue_stops_a_quorum_worker_with_one_clear_line(
    vhost_url: str,
    start_worker: StartWorker,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    # A publisher that started first declared the queue plainly: a classic queue.
    await channel.declare_queue(QUEUE, durable=True)
    with pytest.raises(QueueConflictError) as caught:
        await start_worker(amqp_url=vhost_url, queue_type="quorum")
    assert str(caught.value) == (
        "queue cargolint.webhooks.events exists as a classic queue; "
        "see the README on moving to quorum"
    )
    # Nothing was changed: the queue is still the classic one, and no dead-letter queue came.
    declared = await asyncio.to_thread(queues, vhost_url)
    assert declared[QUEUE]["type"] == "classic"
    assert DEAD_QUEUE not in declared


async def test_a_quorum_queue_stops_a_classic_worker_naming_the_setting(
    vhost_url: str,
    start_worker: StartWorker,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    await start_worker(amqp_url=vhost_url, queue_type="quorum")
    with pytest.raises(QueueConflictError) as caught:
        await start_worker(amqp_url=vhost_url)
    assert str(caught.value) == (
        "queue cargolint.webhooks.events exists as a quorum queue; "
        "set CARGOLINT_QUEUE_TYPE=quorum to use it, or see the README on queue types"
    )


async def test_the_worker_process_exits_2_with_the_message_and_no_stack_trace(
    vhost_url: str,
    wsettings: Settings,
    channel: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await channel.declare_queue(QUEUE, durable=True)
    settings = with_(wsettings, amqp_url=vhost_url, queue_type="quorum")
    assert await asyncio.wait_for(main.run(settings), 60) == 2
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert [r.getMessage() for r in critical] == [
        "queue cargolint.webhooks.events exists as a classic queue; "
        "see the README on moving to quorum"
    ]
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.ERROR)


async def test_classic_queues_are_declared_with_no_arguments(
    vhost_url: str, start_worker: StartWorker
) -> None:
    await start_worker(amqp_url=vhost_url)
    declared = await asyncio.to_thread(queues, vhost_url)
    for name in (QUEUE, DEAD_QUEUE):
        assert (declared[name]["type"], declared[name]["arguments"]) == ("classic", [])


async def test_moving_a_classic_queue_to_quorum_loses_and_doubles_nothing(
    *,
    vhost_url: str,
    start_worker: StartWorker,
    channel: aio_pika.abc.AbstractChannel,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # deploy/README.md's procedure, with AMQP calls where it uses rabbitmqadmin and a shovel.
    classic = await start_worker(amqp_url=vhost_url)
    account, webhook_id, _ = await subscribed(classic, pool, wsettings, receiver.url)
    exchange = await channel.get_exchange(EXCHANGE)
    published: list[dict[str, Any]] = []

    async def publish(count: int) -> None:
        for event in [make_event(account) for _ in range(count)]:
            published.append(event)
            await _publish(channel, json.dumps(event).encode(), event["event"])

    await publish(10)
    # 1. A temporary quorum queue catches new events; 2. the classic queue leaves the exchange.
    moving = await channel.declare_queue(
        f"{QUEUE}.moving", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await moving.bind(exchange, "#")
    await publish(10)  # to both queues
    events_queue = await channel.get_queue(QUEUE)
    await events_queue.unbind(exchange, "#")
    await publish(10)  # to the temporary queue only
    # 3. The classic workers drain their queue; 4. they stop; 5. the classic queues go.
    await wait_final(pool, [dlv(webhook_id, account, e) for e in published[:20]])
    await classic.stop(grace=1.0)
    await channel.queue_delete(QUEUE, if_empty=True)
    await channel.queue_delete(DEAD_QUEUE, if_empty=True)
    await publish(10)  # while no worker runs
    # 6. Quorum workers declare the new queues.
    await start_worker(amqp_url=vhost_url, queue_type="quorum")
    assert (await asyncio.to_thread(queues, vhost_url))[QUEUE]["type"] == "quorum"
    await publish(10)  # to the new queue and the temporary one
    # 7. The temporary queue leaves the exchange; what it holds goes back through it.
    await moving.unbind(exchange, "#")
    while (message := await moving.get(fail=False)) is not None:
        copy = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(copy, routing_key=message.routing_key or "")
        await message.ack()
    # (Quorum queues refuse a delete with if-empty: the loop above emptied it.)
    await channel.queue_delete(f"{QUEUE}.moving")
    await publish(10)

    ids = [dlv(webhook_id, account, e) for e in published]
    rows = await wait_final(pool, ids, timeout=30)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    received = await receiver.wait_for(len(ids))
    await asyncio.sleep(0.5)  # time for a duplicate, were one coming
    sent = sorted(r.headers["X-CargoLint-Delivery"] for r in receiver.requests)
    assert sent == sorted(ids), f"{len(received)} requests for {len(ids)} deliveries"


async def test_a_worker_consumes_again_after_its_queue_is_deleted_under_it(
    *,
    vhost_url: str,
    start_worker: StartWorker,
    channel: aio_pika.abc.AbstractChannel,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # The broker cancels the consumer (here: its queue deleted; in a cluster: a node lost).
    worker = await start_worker(amqp_url=vhost_url, queue_type="quorum")
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    before = make_event(account)
    await _publish(channel, json.dumps(before).encode(), before["event"])
    await wait_final(pool, [dlv(webhook_id, account, before)])
    await channel.queue_delete(QUEUE)

    async def declared_again() -> bool:
        found = await asyncio.to_thread(queues, vhost_url)
        return found.get(QUEUE, {}).get("type") == "quorum"

    await eventually(declared_again, timeout=20, every=0.2)
    after = make_event(account)
    await _publish(channel, json.dumps(after).encode(), after["event"])
    rows = await wait_final(pool, [dlv(webhook_id, account, after)], timeout=20)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert worker.consumer.connected

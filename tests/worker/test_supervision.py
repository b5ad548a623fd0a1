"""A worker whose loop ends before it is stopped says so and exits 1, rather than living on idle;
an ack or reject caught by its connection's close is not such an end; a bug while starting an
endpoint's attempts is retried a second later."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from engine.settings import Settings
from engine.worker import main
from engine.worker.admission import Endpoint
from engine.worker.settling import settle
from tests.receiver import Receiver
from tests.worker.conftest import StartWorker
from tests.worker.helpers import (
    Publisher,
    dlv,
    eventually,
    make_event,
    subscribed,
    wait_final,
)


async def _one_message(amqp_url: str) -> tuple[AbstractConnection, AbstractIncomingMessage]:
    """A connection and a message delivered on it, not yet acked."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
    delivered: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        delivered.set_result(message)

    await queue.consume(on_message)
    return connection, await delivered


async def _ack(message: AbstractIncomingMessage) -> None:
    await settle(message, ack=True, multiple=True)


async def _reject(message: AbstractIncomingMessage) -> None:
    await settle(message, ack=False)


@pytest.mark.parametrize("settle", [_ack, _reject])
@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_an_ack_caught_by_its_connections_close_is_not_an_error(
    amqp_url: str, settle: Any, turns: int
) -> None:
    # The frame is queued, its connection closes before it is written: the wait fails with the
    # close's reason — CancelledError or a bare Exception, found here at 0 and 1 turns — and
    # that once ended the consuming loop. The broker redelivers the message: nothing to do.
    connection, message = await _one_message(amqp_url)
    settling = asyncio.create_task(settle(message))
    for _ in range(turns):
        await asyncio.sleep(0)
    await connection.close()
    await asyncio.wait_for(settling, 10)  # returns, whatever the turn the close came at
    with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
        message.channel  # noqa: B018 - closed with its connection


async def test_cancelling_an_ack_still_cancels_it(amqp_url: str) -> None:
    connection, message = await _one_message(amqp_url)
    try:
        settling = asyncio.create_task(_ack(message))
        await asyncio.sleep(0)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
    finally:
        await connection.close()


async def test_a_loop_that_ends_before_the_stop_fails_the_worker(
    start_worker: StartWorker,
) -> None:
    worker = await start_worker()
    assert not worker.failed.is_set()
    worker.poller.tasks[0].cancel()  # as a CancelledError nobody expected would end it
    await eventually(worker.failed.is_set, timeout=5)
    assert worker.failure == "poller: cancelled"


async def test_a_stop_is_not_a_failure(start_worker: StartWorker) -> None:
    worker = await start_worker()
    await worker.stop(grace=0.5)
    assert not worker.failed.is_set()
    assert worker.failure is None


async def test_the_worker_process_exits_1_when_its_consumer_stops_unexpectedly(
    wsettings: Settings,
) -> None:
    running = asyncio.create_task(main.run(wsettings))
    await eventually(lambda: _task_named("consumer") is not None, timeout=30)
    consumer = _task_named("consumer")
    assert consumer is not None
    consumer.cancel()
    assert await asyncio.wait_for(running, 30) == 1


@pytest.mark.slow
async def test_the_worker_process_exits_0_on_sigterm(wsettings: Settings) -> None:
    running = asyncio.create_task(main.run(wsettings))
    await eventually(lambda: _task_named("consumer") is not None, timeout=30)
    os.kill(os.getpid(), signal.SIGTERM)  # handled by run(), as the CLI's process would
    assert await asyncio.wait_for(running, 30) == 0


def _task_named(name: str) -> asyncio.Task[Any] | None:
    return next((t for t in asyncio.all_tasks() if t.get_name() == name), None)


@pytest.mark.slow
async def test_a_bug_starting_an_endpoints_attempts_is_retried_and_strands_nothing(
    *,
    start_worker: StartWorker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = await start_worker()
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    real_cap = Endpoint.cap
    events = [make_event(account) for _ in range(5)]
    last = dlv(webhook_id, account, events[-1])
    failures: list[str] = []

    def cap_failing_once(ep: Endpoint, running: int, max_in_flight: int, concurrency: int) -> int:
        # A bug where attempts are started, once, when the last job is queued: no job comes
        # after it.
        if not failures and any(job.delivery_id == last for job in ep.queue):
            failures.append(ep.key)
            raise RuntimeError("a bug")
        return real_cap(ep, running, max_in_flight, concurrency)

    monkeypatch.setattr(Endpoint, "cap", cap_failing_once)
    await publisher.publish_many(events)
    # Nothing else comes for that endpoint: only the restart can take the queued jobs on.
    rows = await wait_final(pool, [dlv(webhook_id, account, e) for e in events], timeout=15)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert failures
    assert "starting an endpoint's attempts failed" in caplog.text

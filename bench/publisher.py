"""Publishing events fast enough that the publisher is never what is measured.

Two ways: `prefill` publishes a batch of messages with pipelined publisher confirms (hundreds
outstanding at once, awaited together) before the worker starts; `paced` publishes at a fixed
rate, stamping each message with its publish time, for the latency scenarios.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import aio_pika
from aio_pika.abc import AbstractExchange
from pamqp.commands import Basic

from bench.payload import EVENT_TYPE, event_message

__all__ = ["EXCHANGE", "QUEUE", "Publisher", "publisher"]

EXCHANGE = "cargolint.events"
QUEUE = "cargolint.webhooks.events"
BATCH = 500


class Publisher:
    """An exchange on a confirming channel; each publish batch is awaited as a whole."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, exchange: AbstractExchange) -> None:
        self.channel = channel
        self.exchange = exchange
        self.published = 0

    async def _publish(self, bodies: Sequence[bytes]) -> None:
        confirmations = await asyncio.gather(
            *(
                self.exchange.publish(
                    aio_pika.Message(
                        body,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=EVENT_TYPE,
                    timeout=30,
                )
                for body in bodies
            )
        )
        refused = sum(1 for c in confirmations if not isinstance(c, Basic.Ack))
        if refused:
            raise RuntimeError(f"the broker refused {refused} of {len(bodies)} messages")
        self.published += len(bodies)

    async def prefill(self, events: Sequence[tuple[str, str]]) -> float:
        """Publish (event id, account id) pairs in confirmed batches; return the seconds taken."""
        started = time.perf_counter()
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            await self._publish([event_message(e, a) for e, a in chunk])
        return time.perf_counter() - started

    async def paced(
        self, events: Sequence[tuple[str, str]], rate: float, tick: float = 0.005
    ) -> float:
        """Publish at `rate` messages/s, each stamped when sent; return the achieved rate.

        Every `tick` it sends whatever is due; confirms are awaited in the background so a
        slow confirm never delays the next send, with at most 50 batches outstanding.
        """
        pending: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        sent = 0
        total = len(events)
        try:
            while sent < total:
                due = min(total, int((time.perf_counter() - started) * rate) + 1)
                if due > sent:
                    bodies = [event_message(e, a) for e, a in events[sent:due]]
                    task = asyncio.create_task(self._publish(bodies))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent = due
                    if len(pending) > 50:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(tick)
            elapsed = time.perf_counter() - started
            if pending:
                await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()
        return total / elapsed if elapsed > 0 else 0.0

    async def purge(self) -> int:
        """Drop whatever is left in the engine's queue (between scenarios)."""
        queue = await self.channel.get_queue(QUEUE, ensure=True)
        result = await queue.purge()
        return int(result.message_count or 0)


@contextlib.asynccontextmanager
async def publisher(amqp_url: str) -> AsyncIterator[Publisher]:
    """A connection with a confirming channel and the events exchange (declared idempotently)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        yield Publisher(channel, exchange)
    finally:
        await connection.close()

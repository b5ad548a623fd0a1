"""Publishing events fast enough that the publisher is never what is measured.

Two ways: `prefill` publishes a batch of messages with publisher confirms (hundreds in flight at
once, awaited together) before the worker starts; `paced` publishes at a fixed rate, stamping
each message with its publish time, for the latency scenarios.

Every message is what a real producer sends: persistent (delivery mode 2), `application/json`,
the event type as routing key, to `cargolint.events`, on a channel in confirm mode — through
aiormq's public `Channel.basic_publish`, one call per message, a batch (a prefill chunk, or one
tick of the paced run) gathered so that its confirms are awaited together. With `wait=False` a
publish goes on to its confirm as soon as its frames are queued for writing, rather than after
its write: a whole tick is queued in one turn of the event loop, just after its messages are
stamped. Through aio-pika's `Exchange.publish`, which waits for each message's write before
the next may start, a paced event cost about 60 % more harness CPU (≈ 120 against ≈ 75 µs in
one run of 1,500 events/s; `wait=True` ≈ 95 µs).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast

import aiormq

from bench.payload import EVENT_TYPE, event_message

__all__ = ["EXCHANGE", "QUEUE", "TICK", "Publisher", "publisher"]

EXCHANGE = "cargolint.events"
QUEUE = "cargolint.webhooks.events"
BATCH = 500
# The paced run sends what is due every TICK seconds (each message stamped as it is made).
TICK = 0.01
_CONTENT_TYPE = "application/json"
_PERSISTENT = 2


class Publisher:
    """A confirming channel on the events exchange; each batch's confirms awaited together."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.published = 0

    async def _publish(self, event_id: str, account_id: str) -> None:
        """Publish one event, stamped now; return once the broker confirmed it (a refusal
        raises aiormq's `DeliveryError`)."""
        properties = aiormq.spec.Basic.Properties(
            content_type=_CONTENT_TYPE, delivery_mode=_PERSISTENT, message_id=event_id
        )
        await self.channel.basic_publish(
            event_message(event_id, account_id),
            exchange=EXCHANGE,
            routing_key=EVENT_TYPE,
            properties=properties,
            wait=False,
        )

    def _send(self, events: Sequence[tuple[str, str]]) -> asyncio.Future[list[None]]:
        """Start publishing `events`, all in flight at once; the future ends with their confirms."""
        return asyncio.gather(*(self._publish(event_id, account) for event_id, account in events))

    async def _confirmed(self, batch: asyncio.Future[list[None]]) -> None:
        self.published += len(await asyncio.wait_for(batch, 30))

    async def prefill(self, events: Sequence[tuple[str, str]]) -> float:
        """Publish (event id, account id) pairs in confirmed batches; return the seconds taken."""
        started = time.perf_counter()
        for start in range(0, len(events), BATCH):
            await self._confirmed(self._send(events[start : start + BATCH]))
        return time.perf_counter() - started

    async def paced(
        self, events: Sequence[tuple[str, str]], rate: float, tick: float = TICK
    ) -> float:
        """Publish at `rate` messages/s, each stamped when sent; return the achieved rate.

        Every `tick` it sends whatever is due; confirms are awaited in the background so a
        slow confirm never delays the next send, with at most 50 ticks outstanding. Each
        message is stamped as it is made, when the tick sends it.
        """
        pending: list[asyncio.Future[list[None]]] = []
        started = time.perf_counter()
        sent = 0
        total = len(events)
        try:
            while sent < total:
                due = min(total, int((time.perf_counter() - started) * rate) + 1)
                if due > sent:
                    pending.append(self._send(events[sent:due]))
                    sent = due
                    while len(pending) > 50:
                        await self._confirmed(pending.pop(0))
                await asyncio.sleep(tick)
            elapsed = time.perf_counter() - started
            while pending:
                await self._confirmed(pending.pop(0))
        finally:
            for future in pending:
                future.cancel()
        return total / elapsed if elapsed > 0 else 0.0

    async def purge(self) -> int:
        """Drop whatever is left in the engine's queue (between scenarios)."""
        result = await self.channel.queue_purge(QUEUE)
        return int(result.message_count or 0)


@contextlib.asynccontextmanager
async def publisher(amqp_url: str) -> AsyncIterator[Publisher]:
    """A connection with a confirming channel and the events exchange (declared idempotently)."""
    connection = await aiormq.connect(amqp_url)
    try:
        # The concrete channel: `wait` is a parameter of its basic_publish.
        channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))
        await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        yield Publisher(channel)
    finally:
        await connection.close()

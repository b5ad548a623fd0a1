"""Publishing events fast enough that the publisher is never what is measured.

Two ways: `prefill` publishes a batch of messages with pipelined publisher confirms (hundreds
outstanding at once, awaited together) before the worker starts; `paced` publishes at a fixed
rate, stamping each message with its publish time, for the latency scenarios.

Every message is what a real producer sends: persistent (delivery mode 2), `application/json`,
the event type as routing key, to `cargolint.events`, on a channel in confirm mode. What is cut
is the client's per-message overhead: no aio-pika `Message` objects and no task per message.
A batch (a prefill chunk, or one tick of the paced run) goes to aiormq's channel as one frame
write — one socket write, so the broker reads it in one go and confirms it with a few
`multiple` acks — and its confirms are awaited together.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bench.payload import EVENT_TYPE, event_message

__all__ = ["EXCHANGE", "QUEUE", "TICK", "Publisher", "publisher"]

EXCHANGE = "cargolint.events"
QUEUE = "cargolint.webhooks.events"
BATCH = 500
# The paced run sends what is due every TICK seconds (each message stamped as it is framed).
TICK = 0.01
_CONTENT_TYPE = "application/json"
_PERSISTENT = 2


class Publisher:
    """A confirming aiormq channel; each batch is written at once and its confirms awaited."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, raw: aiormq.Channel) -> None:
        self.channel = channel
        self._raw = raw
        self._publish_frame = Basic.Publish(exchange=EXCHANGE, routing_key=EVENT_TYPE)
        self.published = 0

    def _frames(self, event_id: str, account_id: str) -> list[object]:
        """One message's frames, its body stamped now (the moment it is handed over)."""
        body = event_message(event_id, account_id)
        properties = Basic.Properties(
            content_type=_CONTENT_TYPE, delivery_mode=_PERSISTENT, message_id=event_id
        )
        return [
            self._publish_frame,
            ContentHeader(properties=properties, body_size=len(body)),
            ContentBody(body),
        ]

    async def _send(self, events: Sequence[tuple[str, str]]) -> list[asyncio.Future[object]]:
        """Write `events` as one frame write; return their confirmation futures.

        This is what `aiormq.Channel.basic_publish` does per message (delivery tag, a future in
        `confirmations`, frames on the write queue), done once for the whole batch.
        """
        raw = self._raw
        confirmations: list[asyncio.Future[object]] = []
        async with raw.lock:
            frames: list[object] = []
            for event_id, account_id in events:
                raw.delivery_tag += 1
                future: asyncio.Future[object] = raw.create_future()
                raw.confirmations[raw.delivery_tag] = future
                confirmations.append(future)
                frames += self._frames(event_id, account_id)
            await raw.write_queue.put(
                ChannelFrame.marshall(channel_number=raw.number, frames=frames)  # type: ignore[arg-type]
            )
        return confirmations

    def _check(self, results: Sequence[object]) -> None:
        refused = sum(1 for c in results if not isinstance(c, Basic.Ack))
        if refused:
            raise RuntimeError(f"the broker refused {refused} of {len(results)} messages")
        self.published += len(results)

    async def _confirmed(self, confirmations: Sequence[asyncio.Future[object]]) -> None:
        self._check(await asyncio.wait_for(asyncio.gather(*confirmations), 30))

    async def prefill(self, events: Sequence[tuple[str, str]]) -> float:
        """Publish (event id, account id) pairs in confirmed batches; return the seconds taken."""
        started = time.perf_counter()
        for start in range(0, len(events), BATCH):
            await self._confirmed(await self._send(events[start : start + BATCH]))
        return time.perf_counter() - started

    async def paced(
        self, events: Sequence[tuple[str, str]], rate: float, tick: float = TICK
    ) -> float:
        """Publish at `rate` messages/s, each stamped when sent; return the achieved rate.

        Every `tick` it sends whatever is due as one write; confirms are awaited in the
        background so a slow confirm never delays the next send, with at most 50 ticks
        outstanding. The stamp is taken as each message is framed, not at the tick's start,
        so the tick adds nothing to the measured latency; it only makes arrivals burstier.
        """
        # One gathering future per tick, not a task: confirms cost no extra loop iterations.
        pending: list[asyncio.Future[list[object]]] = []
        started = time.perf_counter()
        sent = 0
        total = len(events)
        try:
            while sent < total:
                due = min(total, int((time.perf_counter() - started) * rate) + 1)
                if due > sent:
                    pending.append(asyncio.gather(*await self._send(events[sent:due])))
                    sent = due
                    while len(pending) > 50:
                        self._check(await asyncio.wait_for(pending.pop(0), 30))
                await asyncio.sleep(tick)
            elapsed = time.perf_counter() - started
            for batch in await asyncio.wait_for(asyncio.gather(*pending), 30):
                self._check(batch)
            pending.clear()
        finally:
            for future in pending:
                future.cancel()
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
        await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
        yield Publisher(channel, raw)
    finally:
        await connection.close()

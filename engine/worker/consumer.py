"""Consuming: events from RabbitMQ in batches → recorded → acknowledged.

Messages are taken in batches: whatever arrived while the previous batch was being written
forms the next one (under a steady flow, after a wait of GATHER for company), so an idle worker
handles each message at once and a busy one writes hundreds per statement. Each batch is
validated, matched, recorded and handed to the dispatcher (`engine.worker.intake`), and its
messages are then acked, a multiple-ack per channel for a few batches at a time
(`engine.worker.settling`); a batch that fails goes back to the queue.

A message is acked only after its batch's insert commits. If the broker connection drops
first, the messages come back and their deliveries are found already there (their ids are
derived from the event and the webhook), so nothing is made twice.

Everything AMQP is aio-pika's public API: a robust connection and channels, which reconnect,
declare the topology again, restore the prefetch and consume again (also after the broker
cancels the consumer); `queue.consume` with a callback that only buffers the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import AMQPError

from engine.settings import Settings
from engine.worker.intake import Intake
from engine.worker.metrics import Metrics
from engine.worker.settling import BROKER_LOST, Acks, being_cancelled
from engine.worker.topology import QUEUE, declare_topology

__all__ = ["Consumer"]

log = logging.getLogger(__name__)

BATCH_MAX = 500
# Under a steady flow (a batch taken within STREAM_GAP) a small batch waits GATHER for more
# messages before it is written: a write costs about the same for one message as for ten.
GATHER = 0.002
GATHER_ENOUGH = 50
STREAM_GAP = 0.05
# The worker is *behind* once its consumer has found a message waiting every time it looked,
# for this long: a backlog, not a steady flow, which leaves it idle between arrivals (failing
# endpoints are paced meanwhile).
BEHIND_AFTER = 0.5
# aio-pika's default is 5 s: most of the recovery time after a broker restart.
RECONNECT_INTERVAL = 1.0


class Consumer:
    """Consumes the events queue over a robust connection. `start()`, `stop()`, `close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        intake: Intake,
        metrics: Metrics,
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._metrics = metrics
        self._worker_id = worker_id
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._buffer: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()
        self._acks = Acks(prefetch=settings.prefetch, wake=self._arrived.set)
        self._last_batch_at = float("-inf")
        self._idle_at = float("inf")  # when it last found nothing to do (inf: not started)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def behind(self) -> bool:
        """Whether messages have been waiting for this worker without a break lately."""
        if not self._arrived.is_set():
            return False  # idle now: nothing has arrived since the last batch was taken
        return asyncio.get_running_loop().time() - self._idle_at >= BEHIND_AFTER

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The consuming loop, while started: it runs until `stop()`."""
        return (self._task,) if self._task is not None else ()

    @property
    def connected(self) -> bool:
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()

    async def start(self) -> None:
        """Connect, declare the topology and start consuming.

        Raise `QueueConflictError` when a queue exists as another type than
        `CARGOLINT_QUEUE_TYPE` asks for.
        """
        connection = await aio_pika.connect_robust(
            self._settings.amqp_url,
            reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"cargolint-webhooks {self._worker_id}"},
        )
        self._connection = connection
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_close)
        try:
            # The robust channel declares the queue, sets the prefetch and consumes again
            # after every reconnection; the topology is declared on it for that.
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._settings.prefetch)
            self._queue, _ = await declare_topology(channel, self._settings.queue_type)
            await self._intake.open(connection)
        except BaseException:
            self._connection = None
            connection.close_callbacks.discard(self._on_close)  # not a connection lost
            await connection.close()
            raise
        self._task = asyncio.create_task(self._run(), name="consumer")
        self._consumer_tag = await self._queue.consume(self._on_message)
        self._metrics.consumer_up.set(1)
        log.info(
            "consuming",
            extra={
                "queue": QUEUE,
                "queue_type": self._settings.queue_type,
                "prefetch": self._settings.prefetch,
            },
        )

    def _on_reconnect(self, *_: Any) -> None:
        self._metrics.consumer_up.set(1)
        log.info("reconnected to RabbitMQ")

    def _on_close(self, *_: Any) -> None:
        self._metrics.consumer_up.set(0)
        if not self._stopping:
            log.warning("connection to RabbitMQ lost; reconnecting")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika calls this in a task per message: it only buffers, the loop does the rest.
        self._buffer.append(message)
        self._arrived.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._arrived.is_set():
                self._idle_at = loop.time()
            await self._arrived.wait()
            if (
                self._buffer
                and len(self._buffer) < GATHER_ENOUGH
                and loop.time() - self._last_batch_at < STREAM_GAP
            ):
                await asyncio.sleep(GATHER)
            batch = self._buffer[:BATCH_MAX]
            del self._buffer[:BATCH_MAX]
            if not self._buffer:
                self._arrived.clear()
            if batch:
                self._last_batch_at = loop.time()
                await self._take(batch, loop.time())
            if self._acks.ready:
                await self._acks.flush()
            self._acks.arm(loop)
        await self._acks.flush()

    async def _take(self, batch: list[AbstractIncomingMessage], now: float) -> None:
        """Process one batch and queue its acks; on failure its messages go back to the queue."""
        try:
            await self._intake.record(batch, now)
        except (*BROKER_LOST, asyncio.CancelledError) as exc:
            # (A dead letter's confirm fails with CancelledError when its connection closes.)
            if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                raise
            log.warning(
                "broker connection lost mid-batch; its messages will be redelivered",
                extra={"messages": len(batch), "error": repr(exc)},
            )
            await self._acks.reject(batch)  # (nothing to do where their channel is gone)
        except Exception:  # a bug in one batch must not stop consuming
            log.exception("batch failed; returning its messages to the queue")
            await asyncio.sleep(1.0)  # no hot loop if it fails again
            await self._acks.reject(batch)
        else:
            self._acks.done(batch)

    async def stop(self, wait: float = 5.0) -> None:
        """Stop taking messages and finish the batch under way, waiting at most `wait` seconds
        (Postgres may be down); unacked messages go back to the queue when the channel closes."""
        self._stopping = True
        queue, tag = self._queue, self._consumer_tag
        self._consumer_tag = None
        if queue is not None and tag is not None:
            with contextlib.suppress(*BROKER_LOST, AMQPError, TimeoutError):
                async with asyncio.timeout(wait):
                    await queue.cancel(tag)
        if self._task is not None:
            self._arrived.set()
            _, late = await asyncio.wait({self._task}, timeout=wait)
            for task in late:
                task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self, wait: float = 5.0) -> None:
        """Stop, then close the connection: what is not acked goes back to the queue."""
        await self.stop(wait)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._metrics.consumer_up.set(0)

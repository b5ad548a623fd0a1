"""Consuming: events from RabbitMQ → validated, matched, recorded, acknowledged, dispatched.

Messages are taken in batches: whatever arrived while the previous batch was being written
forms the next one (under a steady flow, after a wait of GATHER for company), so an idle worker
handles each message at once and a busy one writes hundreds per statement. For each batch, in order:

1. parse and validate every message (`engine.core.events.parse_event`);
2. republish the invalid ones to the dead-letter exchange with `x-cargolint-reason` (publisher
   confirms, so they are safely there before they are acked);
3. match the valid ones against the subscription cache and insert their events and deliveries
   in one statement, claimed by this worker (retried while Postgres is down). If Postgres
   refuses the statement's data (`REJECTED`: a value it cannot store, a constraint violated),
   the batch is split in halves until the events it refuses are alone; those are dead-lettered
   as `store_rejected`, the rest recorded as usual;
4. hand the deliveries that are new to the dispatcher;
5. acknowledge — one multiple-ack per channel for this batch and the ones before it, once
   `ACK_EVERY` messages wait or `ACK_DELAY` after the first: at a paced rate batches are a
   message or two, and an ack each would cost the broker and us more than the rest of it.

A message is acked only after step 3 commits. If the broker connection drops first, the
messages come back and their deliveries are found already there (their ids are derived from
the event and the webhook), so nothing is made twice.

The connection and channel are aio-pika's robust ones (reconnect, qos restored), but messages
are consumed through the underlying aiormq channel: aio-pika's own consume path costs two
tasks, an `IncomingMessage` and a deprecation warning per message, about 40% of the worker's
AMQP cost. The consumer is therefore ours to restore: after every reopen of the channel, and
when the broker cancels it. Below that, the connection reads its frames through
`engine.worker.amqp_frames` (whole socket reads cut into frames, not three reads per frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import DeliveredMessage

from engine.core.events import Event, InvalidEventError, parse_event
from engine.core.ids import delivery_id
from engine.settings import Settings
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from engine.store.queue import retake_due
from engine.worker import amqp_frames
from engine.worker.cache import SubscriptionCache
from engine.worker.dispatcher import Dispatcher
from engine.worker.job import Job
from engine.worker.metrics import Metrics
from engine.worker.retrying import REJECTED, retry_transient

__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "EXCHANGE",
    "QUEUE",
    "REASON_HEADER",
    "STORE_REJECTED",
    "Consumer",
    "declare_topology",
]

log = logging.getLogger(__name__)

EXCHANGE = "cargolint.events"
QUEUE = "cargolint.webhooks.events"
DEAD_EXCHANGE = "cargolint.events.dlx"
DEAD_QUEUE = "cargolint.webhooks.dead"
# Dead-letter reason of a message whose event Postgres refuses to store (`REJECTED`).
STORE_REJECTED = "store_rejected"
REASON_HEADER = "x-cargolint-reason"
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
# Acks wait for company this long at most (they hold prefetch slots meanwhile, nothing else).
ACK_DELAY = 0.02
ACK_EVERY = 200
# aio-pika's default is 5 s: most of the recovery time after a broker restart.
RECONNECT_INTERVAL = 1.0

# The broker went away under us: the batch's messages will be redelivered.
_BROKER_LOST = (
    ChannelInvalidStateError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


async def declare_topology(channel: AbstractChannel) -> tuple[AbstractQueue, AbstractExchange]:
    """Declare exchanges and queues idempotently; return the events queue and the DLX.

    Both queues carry no arguments, so a publisher that declares them plainly never conflicts.
    """
    events = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(QUEUE, durable=True)
    await queue.bind(events, routing_key="#")
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_queue = await channel.declare_queue(DEAD_QUEUE, durable=True)
    await dead_queue.bind(dead, routing_key="#")
    return queue, dead


class Consumer:
    """Consumes the events queue over a robust connection. `start()`, `stop()`, `close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool[Any],
        cache: SubscriptionCache,
        dispatcher: Dispatcher,
        metrics: Metrics,
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._cache = cache
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._worker_id = worker_id
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._dead: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._consuming_on: aiormq.abc.AbstractChannel | None = None
        self._reconsuming: asyncio.Task[None] | None = None
        self._buffer: list[DeliveredMessage] = []
        self._arrived = asyncio.Event()
        # Messages whose effects are durable, to be acked together (in delivery order).
        self._unacked: list[DeliveredMessage] = []
        self._ack_every = max(1, min(ACK_EVERY, settings.prefetch // 4))
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_due = False
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
        amqp_frames.install()
        connection = await aio_pika.connect_robust(
            self._settings.amqp_url,
            reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"cargolint-webhooks {self._worker_id}"},
        )
        self._connection = connection
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_close)
        # Dead letters are published on their own confirming channel, so waiting for a
        # confirm never stalls deliveries arriving on the consuming one.
        publish_channel = await connection.channel(publisher_confirms=True)
        _, self._dead = await declare_topology(publish_channel)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        self._channel = channel
        channel.reopen_callbacks.add(self._on_reopen)
        self._task = asyncio.create_task(self._run(), name="consumer")
        await self._consume()
        self._metrics.consumer_up.set(1)
        log.info("consuming", extra={"queue": QUEUE, "prefetch": self._settings.prefetch})

    async def _consume(self) -> None:
        """Start consuming on the channel's current aiormq channel, unless already there."""
        assert self._channel is not None  # noqa: S101 - set by start()
        amqp = await self._channel.get_underlay_channel()
        if amqp is self._consuming_on:
            return
        amqp.on_consumer_cancel_callbacks.add(self._on_cancelled)
        # Messages reach `_take_message` from the channel's reading loop, in delivery order,
        # with no task per message (engine.worker.amqp_frames); registered before consuming,
        # so no message takes aiormq's own path past it.
        tag = f"ctag{amqp.number}.{uuid.uuid4().hex}"
        amqp_frames.consume_inline(amqp, tag, self._take_message)
        ok = await amqp.basic_consume(QUEUE, self._on_message, consumer_tag=tag)
        self._consuming_on = amqp
        self._consumer_tag = ok.consumer_tag

    async def _on_reopen(self, *_: Any) -> None:
        if self._stopping:
            return
        try:
            await self._consume()
        except (*_BROKER_LOST, aiormq.exceptions.AMQPError) as exc:
            # The channel went away again: it is reopened, and this runs again, once it is back.
            log.warning("could not consume on the reopened channel", extra={"error": repr(exc)})

    def _on_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # The broker cancelled our consumer (the queue was deleted, a node went down).
        if frame.consumer_tag != self._consumer_tag or self._stopping:
            return
        self._consuming_on = None
        if self._reconsuming is None or self._reconsuming.done():
            self._reconsuming = asyncio.create_task(self._reconsume(), name="reconsume")

    async def _reconsume(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RECONNECT_INTERVAL)
            try:
                await self._consume()
            except (*_BROKER_LOST, aiormq.exceptions.AMQPError) as exc:
                log.warning("consuming again failed; retrying", extra={"error": repr(exc)})
            else:
                log.info("consuming again after the broker cancelled the consumer")
                return

    def _on_reconnect(self, *_: Any) -> None:
        self._metrics.consumer_up.set(1)
        log.info("reconnected to RabbitMQ")

    def _on_close(self, *_: Any) -> None:
        self._metrics.consumer_up.set(0)
        if not self._stopping:
            log.warning("connection to RabbitMQ lost; reconnecting")

    def _take_message(self, message: DeliveredMessage) -> None:
        self._buffer.append(message)
        self._arrived.set()

    async def _on_message(self, message: DeliveredMessage) -> None:
        # aiormq's path, should a message ever take it: the same buffer.
        self._take_message(message)

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self._ack_due = True
        self._arrived.set()

    async def _flush_acks(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._ack_due = False
        unacked, self._unacked = self._unacked, []
        if unacked:
            await _ack(unacked)

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
            if self._ack_due or len(self._unacked) >= self._ack_every:
                await self._flush_acks()
            elif self._unacked and self._ack_timer is None:
                self._ack_timer = loop.call_later(ACK_DELAY, self._on_ack_timer)
        await self._flush_acks()

    async def _take(self, batch: list[DeliveredMessage], now: float) -> None:
        """Process one batch and queue its acks; on failure its messages go back to the queue."""
        try:
            await self._process(batch, now)
        except (*_BROKER_LOST, asyncio.CancelledError) as exc:
            # (A dead letter's confirm fails with CancelledError when its connection closes.)
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise
            log.warning(
                "broker connection lost mid-batch; its messages will be redelivered",
                extra={"messages": len(batch), "error": repr(exc)},
            )
            await _nack(batch)  # (nothing to do where their channel is gone, as it should be)
        except Exception:  # a bug in one batch must not stop consuming
            log.exception("batch failed; returning its messages to the queue")
            await asyncio.sleep(1.0)  # no hot loop if it fails again
            await _nack(batch)
        else:
            self._unacked.extend(batch)

    async def _process(self, batch: Sequence[DeliveredMessage], now: float) -> None:
        events: list[Event] = []
        accepted: list[tuple[DeliveredMessage, Event]] = []
        invalid: list[tuple[DeliveredMessage, InvalidEventError]] = []
        for message in batch:
            try:
                event = parse_event(message.body)
            except InvalidEventError as exc:
                invalid.append((message, exc))
            else:
                events.append(event)
                accepted.append((message, event))
        if invalid:
            await asyncio.gather(*(self._dead_letter(m, e) for m, e in invalid))

        deliveries: dict[str, NewDelivery] = {}
        matched: dict[tuple[str, str], Event] = {}
        for event in events:
            for target in self._cache.match(event.account_id, event.mode, event.type):
                dlv = delivery_id(target.id, event.account_id, event.id)
                deliveries.setdefault(dlv, NewDelivery(dlv, target.id, event))
                matched.setdefault((event.account_id, event.id), event)
        # With no room in memory the deliveries stay unclaimed: the poller takes them later.
        hold = self._dispatcher.room() >= len(deliveries)
        parked: dict[str, float] = {}
        if hold:
            parked = self._dispatcher.parking((d.id, d.webhook_id) for d in deliveries.values())
            for dlv, seconds in parked.items():
                deliveries[dlv] = replace(deliveries[dlv], park_for=seconds)
        new_ids: set[str] = set()
        retaken: dict[str, int] = {}
        refused: dict[tuple[str, str], InvalidEventError] = {}
        if deliveries:
            try:
                new_ids, retaken = await self._insert_retrying(
                    list(matched.values()), list(deliveries.values()), hold
                )
            except REJECTED as exc:
                log.warning(
                    "database refused a batch; recording its events apart",
                    extra={"events": len(matched), "error": _refusal(exc)},
                )
                new_ids, retaken, refused = await self._insert_apart(matched, deliveries, hold)
        rejected = [
            (message, refused[key])
            for message, event in accepted
            if (key := (event.account_id, event.id)) in refused
        ]
        if rejected:
            # Their deliveries were not made, so nothing of them is dispatched below.
            await asyncio.gather(*(self._dead_letter(m, e) for m, e in rejected))

        self._metrics.events_consumed_by("accepted").inc(len(events) - len(rejected))
        if invalid or rejected:
            self._metrics.events_consumed_by("dead_lettered").inc(len(invalid) + len(rejected))
        for dlv in new_ids:
            self._metrics.deliveries_created_by(deliveries[dlv].event.type).inc()
        if parked:
            self._metrics.deliveries_parked.inc(sum(1 for dlv in parked if dlv in new_ids))
        if hold and (new_ids or retaken):
            self._dispatcher.submit(
                Job(d.id, d.webhook_id, d.event, 1, now)
                for d in deliveries.values()
                if d.id in new_ids and d.id not in parked
            )
            self._dispatcher.submit(
                Job(d.id, d.webhook_id, d.event, retaken[d.id] + 1)
                for d in deliveries.values()
                if d.id in retaken
            )

    async def _insert_retrying(
        self, events: list[Event], deliveries: list[NewDelivery], hold: bool
    ) -> tuple[set[str], dict[str, int]]:
        return await retry_transient(
            lambda: self._insert(events, deliveries, hold), what="record new deliveries"
        )

    async def _insert_apart(
        self,
        matched: dict[tuple[str, str], Event],
        deliveries: dict[str, NewDelivery],
        hold: bool,
    ) -> tuple[set[str], dict[str, int], dict[tuple[str, str], InvalidEventError]]:
        """Insert a batch Postgres refused as a whole by halves, down to single events.

        Return the new delivery ids, the retaken ones, and the events refused on their own
        (by (account id, event id)) with the dead-letter reason. Each part is one statement,
        so a refused part leaves nothing behind; outages are still retried (`retry_transient`).
        """
        of_event: dict[tuple[str, str], list[NewDelivery]] = {}
        for d in deliveries.values():
            of_event.setdefault((d.event.account_id, d.event.id), []).append(d)
        new_ids: set[str] = set()
        retaken: dict[str, int] = {}
        refused: dict[tuple[str, str], InvalidEventError] = {}
        keys = list(matched)
        parts = [keys[len(keys) // 2 :], keys[: len(keys) // 2]]  # the whole was refused
        while parts:
            part = parts.pop()
            if not part:
                continue
            try:
                new, again = await self._insert_retrying(
                    [matched[k] for k in part], [d for k in part for d in of_event[k]], hold
                )
            except REJECTED as exc:
                if len(part) > 1:
                    parts += [part[len(part) // 2 :], part[: len(part) // 2]]
                else:
                    refused[part[0]] = InvalidEventError(STORE_REJECTED, _refusal(exc))
                continue
            new_ids |= new
            retaken.update(again)
        return new_ids, retaken, refused

    async def _insert(
        self, events: list[Event], deliveries: list[NewDelivery], hold: bool
    ) -> tuple[set[str], dict[str, int]]:
        """Insert; return the new delivery ids, and the existing ones taken up again."""
        # No transaction: the insert is one statement, and retaking is safe to run again.
        async with self._pool.acquire() as conn:
            new_ids = await insert_events_and_deliveries(
                conn, events, deliveries, claimed_by=self._worker_id if hold else None
            )
            existing = [
                d.id
                for d in deliveries
                if d.id not in new_ids and d.id not in self._dispatcher.held
            ]
            retaken: dict[str, int] = {}
            if hold and existing:
                retaken = await retake_due(
                    conn, self._worker_id, existing, lease=self._settings.worker_lease
                )
            return new_ids, retaken

    async def _dead_letter(self, message: DeliveredMessage, error: InvalidEventError) -> None:
        assert self._dead is not None  # noqa: S101 - set by start()
        reason = f"{error.reason}: {error.detail}"[:1000]
        props = message.header.properties
        headers = dict(props.headers or {})
        headers[REASON_HEADER] = reason
        # The original body and properties, made persistent. Not user_id (the broker checks it
        # against our login) nor expiration (a dead letter must not vanish).
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=props.message_id,
            timestamp=props.timestamp,
            type=props.message_type,
            app_id=props.app_id,
        )
        await self._dead.publish(copy, routing_key=message.routing_key or "")
        self._metrics.events_dead_lettered_by(error.reason).inc()
        log.warning(
            "message dead-lettered",
            extra={"reason": reason, "routing_key": message.routing_key},
        )

    async def stop(self, wait: float = 5.0) -> None:
        """Stop taking messages and finish the batch under way, waiting at most `wait` seconds
        (Postgres may be down); unacked messages go back to the queue when the channel closes."""
        self._stopping = True
        if self._reconsuming is not None:
            self._reconsuming.cancel()
        amqp, self._consuming_on = self._consuming_on, None
        if amqp is not None and self._consumer_tag is not None:
            with contextlib.suppress(*_BROKER_LOST, aiormq.exceptions.AMQPError, TimeoutError):
                async with asyncio.timeout(wait):
                    await amqp.basic_cancel(self._consumer_tag)
        if self._task is not None:
            self._arrived.set()
            _, late = await asyncio.wait({self._task}, timeout=wait)
            for task in late:
                task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self, wait: float = 5.0) -> None:
        await self.stop(wait)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._metrics.consumer_up.set(0)


def _refusal(exc: BaseException) -> str:
    """Postgres's own short message, on one line: no statement, no parameters, no detail."""
    message = getattr(exc, "message", None) or type(exc).__name__
    return " ".join(str(message).split())[:300]


async def _ack(batch: Sequence[DeliveredMessage]) -> None:
    """Ack a batch with one multiple-ack per channel (batches are handled in delivery order)."""
    last: dict[int, DeliveredMessage] = {}
    for message in batch:
        last[id(message.channel)] = message
    for message in last.values():
        tag = message.delivery_tag
        if tag is None:
            continue
        try:
            await message.channel.basic_ack(tag, multiple=True)
        except BaseException as exc:
            if not _gone_with_channel(exc, message.channel):
                raise


async def _nack(batch: Sequence[DeliveredMessage]) -> None:
    for message in batch:
        tag = message.delivery_tag
        if tag is None:
            continue
        try:
            await message.channel.basic_reject(tag, requeue=True)
        except BaseException as exc:
            if not _gone_with_channel(exc, message.channel):
                raise


def _gone_with_channel(exc: BaseException, channel: aiormq.abc.AbstractChannel) -> bool:
    """Whether `exc`, raised by an ack or reject on `channel`, only says the channel went away:
    the broker then redelivers the messages, so there is nothing more to do.

    aiormq fails a frame still waiting to be written when its connection closes with whatever the
    close carries: a connection error, a bare `Exception`, or `CancelledError` — which is then not
    this task being cancelled, and must not end it (it once ended the consuming loop, silently).
    """
    if isinstance(exc, _BROKER_LOST):
        return True
    if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
        return False
    return isinstance(exc, Exception | asyncio.CancelledError) and channel.is_closed


def _being_cancelled() -> bool:
    """Whether the running task is being cancelled (rather than handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

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
   A multiple-ack covers every earlier delivery tag of its channel, so it goes no further than
   the tags settled without a gap (`engine.worker.acks.AckWindow`).

A message is acked only after step 3 commits. If the broker connection drops first, the
messages come back and their deliveries are found already there (their ids are derived from
the event and the webhook), so nothing is made twice.

Everything AMQP is aio-pika's public API: a robust connection and channels, which reconnect,
declare the topology again, restore the prefetch and consume again (also after the broker
cancels the consumer); `queue.consume` with a callback that only buffers the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError

from engine.core.events import Event, InvalidEventError, parse_event
from engine.core.ids import delivery_id
from engine.settings import Settings
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from engine.store.queue import retake_due
from engine.worker.acks import AckWindow
from engine.worker.cache import SubscriptionCache
from engine.worker.dispatcher import Dispatcher
from engine.worker.job import Job
from engine.worker.metrics import Metrics
from engine.worker.retrying import REJECTED, retry_transient
from engine.worker.topology import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EXCHANGE,
    QUEUE,
    QueueConflictError,
    declare_topology,
)

__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "EXCHANGE",
    "QUEUE",
    "REASON_HEADER",
    "STORE_REJECTED",
    "Consumer",
    "QueueConflictError",
    "declare_topology",
]

log = logging.getLogger(__name__)

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
# A delivery tag still missing this long after later ones were done: ack those one by one.
ACK_GAP_PATIENCE = 5.0
# aio-pika's default is 5 s: most of the recovery time after a broker restart.
RECONNECT_INTERVAL = 1.0

# The broker went away under us: the batch's messages will be redelivered.
_BROKER_LOST = (ChannelInvalidStateError, AMQPConnectionError, ConnectionError)


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
        self._queue: AbstractQueue | None = None
        self._dead: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._buffer: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()
        # Messages whose effects are durable, to be acked, by the channel they came on.
        self._acks: dict[Any, AckWindow[AbstractIncomingMessage]] = {}
        self._unacked = 0
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
            # Dead letters are published on their own confirming channel, so waiting for a
            # confirm never stalls deliveries arriving on the consuming one.
            publish_channel = await connection.channel(publisher_confirms=True)
            self._dead = await publish_channel.declare_exchange(
                DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
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
            if self._ack_due or self._unacked >= self._ack_every:
                await self._flush_acks()
            if self._unacked and self._ack_timer is None:
                self._ack_timer = loop.call_later(ACK_DELAY, self._on_ack_timer)
        await self._flush_acks()

    async def _take(self, batch: list[AbstractIncomingMessage], now: float) -> None:
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
            await self._return(batch)  # (nothing to do where their channel is gone)
        except Exception:  # a bug in one batch must not stop consuming
            log.exception("batch failed; returning its messages to the queue")
            await asyncio.sleep(1.0)  # no hot loop if it fails again
            await self._return(batch)
        else:
            for message in batch:
                window = self._window(message)
                if window is not None and message.delivery_tag is not None:
                    window.done(message.delivery_tag, message)
                    self._unacked += 1

    def _window(
        self, message: AbstractIncomingMessage
    ) -> AckWindow[AbstractIncomingMessage] | None:
        """The acks of the channel `message` came on; None once that channel is closed (the
        broker then redelivers the message: nothing to ack)."""
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return None
        window = self._acks.get(channel)
        if window is None:
            window = self._acks[channel] = AckWindow(ACK_GAP_PATIENCE)
        return window

    async def _return(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Reject `batch` back to the queue, to be delivered again."""
        for message in batch:
            window = self._window(message)
            if window is None or message.delivery_tag is None:
                continue
            window.returned(message.delivery_tag)
            await _settle(message, ack=False)

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self._ack_due = True
        self._arrived.set()

    async def _flush_acks(self) -> None:
        """Ack what is done: a multiple-ack per channel up to its first gap (see AckWindow)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._ack_due = False
        now = asyncio.get_running_loop().time()
        for channel, window in list(self._acks.items()):
            if channel.is_closed:
                del self._acks[channel]  # its messages are redelivered
                continue
            last, alone = window.take(now)
            if alone:
                log.warning(
                    "a delivery never reached the consumer; acking later ones one by one",
                    extra={"delivery_tag": window.gap, "messages": len(alone)},
                )
            for message in alone:
                await _settle(message, ack=True)
            if last is not None:
                await _settle(last, ack=True, multiple=True)
        self._unacked = sum(len(window) for window in self._acks.values())

    async def _process(self, batch: Sequence[AbstractIncomingMessage], now: float) -> None:
        """Validate the batch, dead-letter what is invalid, record and dispatch the rest."""
        events: list[Event] = []
        accepted: list[tuple[AbstractIncomingMessage, Event]] = []
        invalid: list[tuple[AbstractIncomingMessage, InvalidEventError]] = []
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
        await self._record(events, accepted, invalid, now)

    async def _record(
        self,
        events: list[Event],
        accepted: list[tuple[AbstractIncomingMessage, Event]],
        invalid: list[tuple[AbstractIncomingMessage, InvalidEventError]],
        now: float,
    ) -> None:
        """Insert the valid events and their deliveries, then hand the new ones to the
        dispatcher; dead-letter the events Postgres refuses to store."""
        deliveries: dict[str, NewDelivery] = {}
        matched: dict[tuple[str, str], Event] = {}
        for event in events:
            for target in self._cache.match(event.account_id, event.mode, event.type):
                dlv = delivery_id(target.id, event.account_id, event.id)
                deliveries.setdefault(dlv, NewDelivery(dlv, target.id, event))
                matched.setdefault((event.account_id, event.id), event)
        deliveries = await self._placed(deliveries)
        new_ids: set[str] = set()
        retaken: dict[str, int] = {}
        refused: dict[tuple[str, str], InvalidEventError] = {}
        if deliveries:
            try:
                new_ids, retaken = await self._insert_retrying(
                    list(matched.values()), list(deliveries.values())
                )
            except REJECTED as exc:
                log.warning(
                    "database refused a batch; recording its events apart",
                    extra={"events": len(matched), "error": _refusal(exc)},
                )
                new_ids, retaken, refused = await self._insert_apart(matched, deliveries)
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
        if parked := sum(1 for d in deliveries.values() if d.park_for > 0 and d.id in new_ids):
            self._metrics.deliveries_parked.inc(parked)
        if new_ids or retaken:
            self._dispatcher.submit(
                Job(d.id, d.webhook_id, d.event, 1, now)
                for d in deliveries.values()
                if d.id in new_ids and d.claimed and d.park_for <= 0
            )
            self._dispatcher.submit(
                Job(d.id, d.webhook_id, d.event, retaken[d.id] + 1)
                for d in deliveries.values()
                if d.id in retaken
            )

    async def _placed(self, deliveries: dict[str, NewDelivery]) -> dict[str, NewDelivery]:
        """The deliveries with their endpoint and whether this worker claims them.

        It claims those whose endpoint it sends to (it holds or takes the endpoint's lease)
        while that endpoint and the worker have room in memory (`Dispatcher.place`). The rest
        are created unclaimed, for the poller of the worker that sends to their endpoint (a
        full failing endpoint's parked, due a while later).
        """
        placed = await self._dispatcher.place((d.id, d.webhook_id) for d in deliveries.values())
        for dlv, where in placed.items():
            deliveries[dlv] = replace(
                deliveries[dlv],
                endpoint=where.endpoint,
                claimed=where.claimed,
                park_for=where.park_for,
            )
        return deliveries

    async def _insert_retrying(
        self, events: list[Event], deliveries: list[NewDelivery]
    ) -> tuple[set[str], dict[str, int]]:
        return await retry_transient(
            lambda: self._insert(events, deliveries), what="record new deliveries"
        )

    async def _insert_apart(
        self,
        matched: dict[tuple[str, str], Event],
        deliveries: dict[str, NewDelivery],
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
                    [matched[k] for k in part], [d for k in part for d in of_event[k]]
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
        self, events: list[Event], deliveries: list[NewDelivery]
    ) -> tuple[set[str], dict[str, int]]:
        """Insert; return the new delivery ids, and the existing ones taken up again."""
        # No transaction: the insert is one statement, and retaking is safe to run again.
        async with self._pool.acquire() as conn:
            new_ids = await insert_events_and_deliveries(
                conn, events, deliveries, claimed_by=self._worker_id
            )
            existing = [
                d.id
                for d in deliveries
                if d.id not in new_ids and d.claimed and d.id not in self._dispatcher.held
            ]
            retaken: dict[str, int] = {}
            if existing:
                retaken = await retake_due(
                    conn, self._worker_id, existing, lease=self._settings.worker_lease
                )
            return new_ids, retaken

    async def _dead_letter(
        self, message: AbstractIncomingMessage, error: InvalidEventError
    ) -> None:
        assert self._dead is not None  # noqa: S101 - set by start()
        reason = f"{error.reason}: {error.detail}"[:1000]
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        # The original body and properties, made persistent. Not user_id (the broker checks it
        # against our login) nor expiration (a dead letter must not vanish).
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
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
        queue, tag = self._queue, self._consumer_tag
        self._consumer_tag = None
        if queue is not None and tag is not None:
            with contextlib.suppress(*_BROKER_LOST, AMQPError, TimeoutError):
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


def _refusal(exc: BaseException) -> str:
    """Postgres's own short message, on one line: no statement, no parameters, no detail."""
    message = getattr(exc, "message", None) or type(exc).__name__
    return " ".join(str(message).split())[:300]


async def _settle(message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False) -> None:
    """Ack `message` (with every earlier one of its channel when `multiple`), or reject it back
    to the queue; nothing to do when its channel went away meanwhile."""
    try:
        if ack:
            await message.ack(multiple=multiple)
        else:
            await message.reject(requeue=True)
    except BaseException as exc:
        if not _gone_with_channel(exc, message):
            raise


def _gone_with_channel(exc: BaseException, message: AbstractIncomingMessage) -> bool:
    """Whether `exc`, raised by an ack or reject of `message`, only says its channel went away:
    the broker then redelivers the messages, so there is nothing more to do.

    A frame still waiting to be written when its connection closes fails with whatever the
    close carries: a connection error, a bare `Exception`, or `CancelledError` — which is then not
    this task being cancelled, and must not end it (it once ended the consuming loop, silently).
    """
    if isinstance(exc, _BROKER_LOST):
        return True
    if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
        return False
    return isinstance(exc, Exception | asyncio.CancelledError) and _channel_closed(message)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 - aio-pika raises here once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


def _being_cancelled() -> bool:
    """Whether the running task is being cancelled (rather than handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

"""Intake: one batch of consumed messages → validated, matched, recorded, dispatched.

For each batch, in order:

1. parse and validate every message (`engine.core.events.parse_event`);
2. dead-letter the invalid ones (`engine.worker.dead_letters`);
3. match the valid ones against the subscription cache and insert their events and deliveries
   in one statement, claimed by this worker where it sends to their endpoint and has room
   (`Dispatcher.place`), retried while Postgres is down. If Postgres refuses the statement's
   data (`REJECTED`: a value it cannot store, a constraint violated), the batch is split in
   halves until the events it refuses are alone; those are dead-lettered as `store_rejected`,
   the rest recorded as usual;
4. hand the deliveries that are new to the dispatcher.

When `record` returns, the batch's effects are durable and its messages may be acked. A
delivery already there (a redelivered message: ids are derived from the event and the webhook)
is not made twice; one that waits due is taken up again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from engine.core.events import Event, InvalidEventError, parse_event
from engine.core.ids import delivery_id
from engine.settings import Settings
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from engine.store.queue import retake_due
from engine.worker.cache import SubscriptionCache
from engine.worker.dead_letters import STORE_REJECTED, DeadLetters
from engine.worker.dispatcher import Dispatcher
from engine.worker.job import Job
from engine.worker.metrics import Metrics
from engine.worker.retrying import REJECTED, retry_transient

__all__ = ["Intake"]

log = logging.getLogger(__name__)


class Intake:
    """Records batches of consumed messages: `open(connection)`, then `record(batch, now)`."""

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
        self._dead_letters = DeadLetters(metrics)
        self._metrics = metrics
        self._worker_id = worker_id

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Ready the dead letters' channel on the consumer's connection."""
        await self._dead_letters.open(connection)

    async def record(self, batch: Sequence[AbstractIncomingMessage], now: float) -> None:
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
            await asyncio.gather(*(self._dead_letters.publish(m, e) for m, e in invalid))
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
            await asyncio.gather(*(self._dead_letters.publish(m, e) for m, e in rejected))

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


def _refusal(exc: BaseException) -> str:
    """Postgres's own short message, on one line: no statement, no parameters, no detail."""
    message = getattr(exc, "message", None) or type(exc).__name__
    return " ".join(str(message).split())[:300]

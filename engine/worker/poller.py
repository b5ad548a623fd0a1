"""Polling: due deliveries from Postgres, per endpoint this worker sends to, and the heartbeat.

Retries are rows, not timers: a failed attempt stores `next_attempt_at` and releases its claim.
Every `poll_interval` this claims, for each endpoint whose lease this worker holds, the due
pending rows no live worker holds — as many as that endpoint and the worker have room for, with
`FOR UPDATE SKIP LOCKED` — and hands them to the dispatcher: retries, deliveries other workers
created for those endpoints, the backlog beyond what an endpoint holds in memory. Then it looks
for endpoints that have due work and no live lease holder (theirs was released when idle, or
its worker died), takes some of their leases and claims for them too.

The heartbeat keeps this worker's claims and leases valid; when a worker stops beating for
`worker_lease`, the others take its claimed rows and its endpoints over. Each beat also drops
the leases another worker took meanwhile and gives up those of endpoints idle for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from typing import Any

import asyncpg

from engine.settings import Settings
from engine.store.endpoints import fill_endpoints, unowned_with_due_work
from engine.store.queue import (
    claim_due,
    heartbeat,
    own_stale,
    queue_depth,
    release_deliveries,
    release_lapsed,
)
from engine.worker.dispatcher import Dispatcher
from engine.worker.job import Job
from engine.worker.leases import Leases
from engine.worker.metrics import Metrics
from engine.worker.retrying import TRANSIENT, retry_transient

__all__ = ["Poller"]

log = logging.getLogger(__name__)

# Endpoints with due work and no live holder this worker takes on per poll: a few at a time,
# so that the workers of a fleet share them out rather than the first poller taking them all.
DISCOVER_BATCH = 16
# The retries gauges count every pending delivery in Postgres (≈ 0.2 s of its CPU for a million):
# read at the first beat, then no more often than this, not on every beat of every worker.
DEPTH_EVERY = 30.0


class Poller:
    """Claims due deliveries and keeps this worker's heartbeat. `start()` / `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool[Any],
        dispatcher: Dispatcher,
        metrics: Metrics,
        leases: Leases,
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._leases = leases
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._worker_id = worker_id
        self._hostname = socket.gethostname()
        self._tasks: list[asyncio.Task[None]] = []
        self._depth_at = float("-inf")

    @property
    def beat_interval(self) -> float:
        return min(self._settings.worker_lease / 3, 5.0)

    @property
    def idle_for(self) -> float:
        """An endpoint's lease is given up once it has had nothing to do for this long."""
        return max(2.0, 2 * self.beat_interval)

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """Polling and heartbeat, while started: they run until `stop()`."""
        return tuple(self._tasks)

    async def start(self) -> None:
        """Register this worker (before it claims anything), then poll and beat."""
        await retry_transient(self._beat, what="register worker", give_up_after=30.0)
        self._tasks = [
            asyncio.create_task(self._poll_forever(), name="poller"),
            asyncio.create_task(self._beat_forever(), name="heartbeat"),
        ]

    async def stop_polling(self) -> None:
        """Claim nothing more, but keep beating: the attempts under way still need this
        worker's claims and endpoint leases until they end (`stop` ends the beating)."""
        polling = [t for t in self._tasks if t.get_name() == "poller"]
        for task in polling:
            task.cancel()
        await asyncio.gather(*polling, return_exceptions=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _beat(self) -> None:
        sent_at = time.monotonic()
        await heartbeat(self._pool, self._worker_id, self._hostname)
        self._leases.renewed(sent_at)

    async def _beat_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.beat_interval)
            try:
                await self._beat()
                await self._tend_leases()
                await self._release_orphans()
                await self._release_lapsed()
                if loop.time() - self._depth_at >= DEPTH_EVERY:
                    depth = await queue_depth(self._pool)
                    self._depth_at = loop.time()
                    self._metrics.retries_due.set(depth.due)
                    self._metrics.retries_pending.set(depth.waiting)
            except TRANSIENT as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            except Exception:  # keep beating: losing the lease hands our work to others
                log.exception("heartbeat failed")

    async def _tend_leases(self) -> None:
        """Drop the leases another worker took over (after this one's beats failed for a
        while), and give up those of endpoints idle for `idle_for`."""
        lost = await self._leases.verify()
        if lost:
            self._dispatcher.disown(lost)
            log.warning("endpoint leases taken over by other workers", extra={"count": len(lost)})
        idle = self._dispatcher.idle(self.idle_for)
        if idle:
            self._leases.forget(idle)  # first: from now on their deliveries go to Postgres
            await self._leases.release(idle)
        filled = await fill_endpoints(self._pool)
        if filled:
            log.info("named the endpoint of pending deliveries", extra={"count": filled})

    async def _release_orphans(self) -> None:
        """Release claims this worker holds on rows it no longer has in memory.

        Only an ambiguous failure (a commit that went through, then a lost connection) leaves
        such rows; they are overdue by a lease and not held, so other pollers may take them.
        """
        stale = await own_stale(self._pool, self._worker_id, overdue=self._settings.worker_lease)
        orphans = [d for d in stale if d not in self._dispatcher.held]
        if orphans:
            await release_deliveries(self._pool, orphans)
            log.warning("released orphaned claims", extra={"count": len(orphans)})

    async def _release_lapsed(self) -> None:
        """Hand the claims of gone or silent workers back to `claim_due` (reads every claimed
        delivery, hence once a beat rather than once a poll)."""
        released = await release_lapsed(
            self._pool, self._worker_id, lease=self._settings.worker_lease
        )
        if released:
            log.warning("released claims of lapsed workers", extra={"count": released})

    async def poll_once(self) -> int:
        """Claim what is due for the endpoints this worker sends to (each up to its room) and
        dispatch it; then take on a few endpoints with due work and no live holder. Returns
        the count claimed."""
        claimed = await self._claim(self._dispatcher.wants())
        if self._dispatcher.room() > 0:
            found = await unowned_with_due_work(
                self._pool, lease=self._settings.worker_lease, limit=DISCOVER_BATCH
            )
            taken = await self._dispatcher.lease(found)
            if taken:
                wants = self._dispatcher.wants()
                claimed += await self._claim({key: wants.get(key, 0) for key in taken})
        return claimed

    async def _claim(self, wants: dict[str, int]) -> int:
        claimed = await claim_due(self._pool, self._worker_id, wants)
        self._dispatcher.claimed(wants, Counter(c.endpoint or "" for c in claimed))
        if claimed:
            self._dispatcher.submit(
                Job(c.id, c.webhook_id, c.event, c.attempts + 1, retry_base=c.retry_base)
                for c in claimed
            )
            log.debug("claimed due deliveries", extra={"count": len(claimed)})
        return len(claimed)

    async def _poll_forever(self) -> None:
        while True:
            try:
                claimed = await self.poll_once()
            except TRANSIENT as exc:
                log.warning("claiming due deliveries failed", extra={"error": str(exc)})
                claimed = 0
            except Exception:  # keep polling: retries must not stop for one bad turn
                log.exception("claiming due deliveries failed")
                await asyncio.sleep(1.0)
                claimed = 0
            # Deliveries claimed mean more may be due: claim again soon, not a full interval on;
            # and at once when an endpoint with a backlog in Postgres has room for more.
            room = self._dispatcher.room_for_backlog
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    room.wait(), self._settings.poll_interval / (4 if claimed else 1)
                )
            room.clear()

"""Polling: due retries (and deliveries whose worker died) from Postgres, and the heartbeat.

Retries are rows, not timers: a failed attempt stores `next_attempt_at` and releases its claim.
Every `poll_interval` this claims due pending rows that no live worker holds — with
`FOR UPDATE SKIP LOCKED`, so workers never wait on or take each other's rows — and hands them to
the dispatcher, as many as it has room for. The heartbeat keeps this worker's claims valid;
when a worker stops beating for `worker_lease`, the others take its claimed rows over.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import asyncpg

from engine.settings import Settings
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
from engine.worker.metrics import Metrics
from engine.worker.retrying import TRANSIENT, retry_transient

__all__ = ["Poller"]

log = logging.getLogger(__name__)

CLAIM_BATCH = 500
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
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._pool = pool
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

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _beat(self) -> None:
        await heartbeat(self._pool, self._worker_id, self._hostname)

    async def _beat_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.beat_interval)
            try:
                await self._beat()
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
        """Claim what is due (up to the dispatcher's room) and dispatch it; return the count."""
        limit = min(CLAIM_BATCH, self._dispatcher.room())
        skip = self._dispatcher.held_back()
        claimed = await claim_due(self._pool, self._worker_id, limit=limit, skip=skip)
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
            # A full batch means more may be due: claim again at once.
            if claimed < CLAIM_BATCH:
                await asyncio.sleep(self._settings.poll_interval)

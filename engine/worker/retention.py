"""Retention: every few seconds one worker of the fleet removes what `CARGOLINT_RETENTION` let go.

A run takes the purge's advisory lock on a connection of its own, closed at the end of the run
(another worker's run in progress: this one skips its turn), then removes finished deliveries
older than the retention in batches of `BATCH` rows, pausing between batches so that the purge
uses at most `CARGOLINT_PURGE_SHARE` of one Postgres backend (a tenth by default), for at most
`RUN_BUDGET` seconds before it lets the lock go. A run that stopped with work left is followed
by another at once; otherwise the next starts after `EVERY` seconds, so a delivery disappears
well within a minute of passing the retention. Under the same lock, a run folds the changes
recorded to the delivery lists' per-hour counts, and every `COUNT_EVERY` seconds counts the
hours that settled (engine/store/delivery_counts.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from engine.settings import Settings
from engine.store.db import connect
from engine.store.delivery_counts import count_hours, fold_changes
from engine.store.retention import (
    Removed,
    oldest_finished,
    purge_batch,
    try_purge_lock,
)
from engine.worker.metrics import Metrics
from engine.worker.retrying import TRANSIENT

__all__ = ["Purger", "RunResult", "pause_after"]

log = logging.getLogger(__name__)

EVERY = 15.0
# Small batches: each one's work lands on the cores and the WAL the deliveries use, at once. With
# 5,000 a batch every ~6 s stalled paced deliveries for 150-200 ms (p99 45 -> 155 ms).
BATCH = 1000
RUN_BUDGET = 10.0
# How often a run also counts the hours that settled for long delivery lists (hours settle once
# an hour; this also notices a webhook whose history grew long enough to be counted).
COUNT_EVERY = 600.0


def pause_after(batch_seconds: float, share: float) -> float:
    """How long to wait after a batch that took `batch_seconds` so that the purge keeps to
    `share` of one backend: busy b of every b / share seconds."""
    return batch_seconds * (1.0 / share - 1.0)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run did: whether it held the lock, what it removed, whether work is left."""

    held: bool
    removed: Removed = field(default_factory=Removed)
    more: bool = False
    seconds: float = 0.0


class Purger:
    """Runs the purge until `stop()`. `run_once()` is one run, for tests and for the loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        batch: int = BATCH,
        budget: float = RUN_BUDGET,
    ) -> None:
        self._retention = timedelta(seconds=settings.retention)
        self._share = settings.purge_share
        self._dsn = settings.database_url
        self._metrics = metrics
        self._batch = batch
        self._budget = budget
        self._tasks: list[asyncio.Task[None]] = []
        self._count_at = float("-inf")

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The purge loop, while started: it runs until `stop()`."""
        return tuple(self._tasks)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._forever(), name="retention")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def run_once(self) -> RunResult:
        """One run: nothing if another worker's run holds the lock."""
        started = time.perf_counter()
        removed = Removed()
        more = False
        counted = 0
        # A connection of its own: closing it lets the session lock go, whatever happened.
        conn = await connect(self._dsn)
        try:
            if not await try_purge_lock(conn):
                return RunResult(held=False)
            while True:
                batch_started = time.perf_counter()
                cutoff = datetime.now(UTC) - self._retention
                batch = await purge_batch(conn, cutoff, self._batch)
                self._count(batch)
                removed += batch
                more = batch.deliveries >= self._batch
                if not more or time.perf_counter() - started >= self._budget:
                    break
                await asyncio.sleep(pause_after(time.perf_counter() - batch_started, self._share))
            if time.monotonic() >= self._count_at:
                counted = await count_hours(conn, datetime.now(UTC))
                self._count_at = time.monotonic() + COUNT_EVERY
            folded = await fold_changes(conn)
            oldest = await oldest_finished(conn)
        finally:
            await conn.close()
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self._metrics.retention_oldest_kept.set(max(0.0, age))
        seconds = time.perf_counter() - started
        log.log(
            logging.INFO if removed.deliveries else logging.DEBUG,
            "retention purge run",
            extra={
                "deliveries": removed.deliveries,
                "attempts": removed.attempts,
                "events": removed.events,
                "seconds": round(seconds, 3),
                "more": more,
                "webhooks_counted": counted,
                "count_changes_folded": folded,
            },
        )
        return RunResult(held=True, removed=removed, more=more, seconds=seconds)

    def _count(self, batch: Removed) -> None:
        by = self._metrics.retention_removed_by
        by("deliveries").inc(batch.deliveries)
        by("delivery_attempts").inc(batch.attempts)
        by("events").inc(batch.events)

    async def _forever(self) -> None:
        while True:
            try:
                result = await self.run_once()
            except TRANSIENT as exc:
                log.warning("retention purge failed", extra={"error": str(exc)})
                result = None
            except Exception:  # keep purging: one bad run must not stop retention for good
                log.exception("retention purge failed")
                result = None
            await asyncio.sleep(0.1 if result is not None and result.more else EVERY)

"""Recording attempts: batched writes of what each attempt came to and what happens next.

Attempts are queued in memory and written in batches, one statement per batch: whatever
arrived while the previous batch was being written goes in the next one (under a steady flow,
after a wait of GATHER for company), so batches grow with load and an idle worker writes each
attempt at once. A failed attempt with attempts left gets
`next_attempt_at` from the retry schedule (Retry-After honoured) and loses its claim, so any
worker's poller may take it when due; after the last attempt the delivery is `failed`.
Parked deliveries (a failing endpoint had no room for them) lose their claim the same way, due
again a while later, with no attempt recorded.

Each batch also tells the webhooks' failing streaks (`engine.store.disabling`): a receiver that
answered 410 Gone, or whose attempts have all failed for `disable_after`, has its webhook
disabled, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from engine.core.backoff import next_delay
from engine.delivery import Outcome
from engine.settings import Settings
from engine.store.deliveries import AttemptRecord, record_attempts
from engine.store.disabling import Seen, disable_webhooks, note_streaks, streaks
from engine.store.queue import (
    end_deliveries,
    hand_back_deliveries,
    park_deliveries,
    release_deliveries,
)
from engine.worker.job import Job
from engine.worker.metrics import Metrics
from engine.worker.retrying import retry_transient

__all__ = ["GONE", "Recorder"]

log = logging.getLogger(__name__)

GONE = "webhook deleted or inactive"
# A receiver that answers this wants no more deliveries: the delivery ends, the webhook is
# disabled (docs/contract.md §6, as Standard Webhooks asks).
HTTP_GONE = 410
# The dispatcher's error class for an attempt that failed inside the worker: not the receiver's
# doing, so it says nothing about the webhook's failing streak.
INTERNAL = "internal"
# As in the consumer: under a steady flow a small batch waits a little for company. Nobody
# waits on these writes but the deliveries' records, so the wait may be longer.
GATHER = 0.005
GATHER_ENOUGH = 50
STREAM_GAP = 0.05


def _clean(text: str | None) -> str | None:
    # Postgres text cannot hold NUL, and a receiver may well send one.
    return None if text is None else text.replace("\x00", "\ufffd")


class Recorder:
    """Turns outcomes into durable delivery state. Use `start()` / `close()`."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool[Any], metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._records: list[AttemptRecord] = []
        self._gone: list[str] = []
        self._parked: list[tuple[str, datetime]] = []
        self._seen: list[Seen] = []
        self._gone_webhooks: set[str] = set()  # whose receiver answered 410 Gone
        self._handed_back: list[tuple[str, str]] = []
        self._pending = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # Told the delivery ids of every batch once it is written (the dispatcher's `forget`).
        self.on_written: Callable[[list[str]], None] = lambda _: None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recorder")

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The writing loop, while started: it runs until `close()`."""
        return (self._task,) if self._task is not None else ()

    def attempted(self, job: Job, outcome: Outcome, attempted_at: datetime) -> None:
        """Queue the record of one finished attempt."""
        event_type = job.event.type
        self._metrics.attempts_by(event_type, outcome.error_class or "success").inc()
        self._metrics.attempt_duration.observe(outcome.elapsed_ms / 1000)
        ids = {"delivery_id": job.delivery_id, "webhook_id": job.webhook_id}
        ids["event_id"] = job.event.id
        next_at: datetime | None = None
        if outcome.succeeded:
            status = "succeeded"
            self._metrics.deliveries_by(event_type, "succeeded").inc()
            log.debug("delivered", extra={**ids, "attempt": job.attempt})
        else:
            gone = outcome.status == HTTP_GONE
            delay = None
            if not gone:  # the schedule counts from where the last resend began it
                delay = next_delay(
                    job.attempt,
                    self._settings.retry_schedule,
                    retry_base=job.retry_base,
                    retry_after=outcome.retry_after,
                )
            extra = {**ids, "attempt": job.attempt, "error": outcome.error}
            if delay is None:
                status = "failed"
                self._metrics.deliveries_by(event_type, "failed").inc()
                if gone:
                    log.warning("receiver answered 410 Gone; delivery failed", extra=extra)
                else:
                    log.warning("delivery failed after its last attempt", extra=extra)
            else:
                status = "pending"
                # The wait counts from the failure, when the answer came or the attempt gave
                # up: Retry-After is relative to the response, and after a timeout longer than
                # the scheduled wait the retry must not be due at once.
                failed_at = attempted_at + timedelta(milliseconds=outcome.elapsed_ms)
                next_at = failed_at + timedelta(seconds=delay)
                self._metrics.retries_scheduled_by(event_type).inc()
                log.info("attempt failed; retry scheduled", extra={**extra, "retry_in_s": delay})
        self._records.append(
            AttemptRecord(
                delivery_id=job.delivery_id,
                number=job.attempt,
                attempted_at=attempted_at,
                response_status=outcome.status,
                response_time_ms=outcome.elapsed_ms,
                error_class=outcome.error_class,
                error=_clean(outcome.error),
                response_body=_clean(outcome.body),
                status=status,
                next_attempt_at=next_at,
            )
        )
        if outcome.error_class != INTERNAL:
            self._seen.append(Seen(job.webhook_id, attempted_at, outcome.succeeded))
            if outcome.status == HTTP_GONE:
                self._gone_webhooks.add(job.webhook_id)
        self._wake()

    def gone(self, job: Job) -> None:
        """End a delivery whose webhook is deleted or inactive, without an attempt."""
        self._metrics.deliveries_by(job.event.type, "failed").inc()
        log.info(
            "delivery ended: webhook deleted or inactive",
            extra={"delivery_id": job.delivery_id, "webhook_id": job.webhook_id},
        )
        self._gone.append(job.delivery_id)
        self._wake()

    def park(self, job: Job, seconds: float) -> None:
        """Give the delivery back to Postgres, due again in `seconds` at the earliest."""
        self._metrics.deliveries_parked.inc()
        until = datetime.now(UTC) + timedelta(seconds=seconds)
        self._parked.append((job.delivery_id, until))
        self._wake()

    def hand_back(self, job: Job, endpoint: str) -> None:
        """Give the delivery back to Postgres, due as it was, for the worker that sends to
        `endpoint` (its endpoint now)."""
        self._handed_back.append((job.delivery_id, endpoint))
        self._wake()

    def _waiting(self) -> int:
        return len(self._records) + len(self._gone) + len(self._parked) + len(self._handed_back)

    def _wake(self) -> None:
        self._idle.clear()
        self._pending.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_batch_at = float("-inf")
        while True:
            await self._pending.wait()
            if self._waiting() < GATHER_ENOUGH and loop.time() - last_batch_at < STREAM_GAP:
                await asyncio.sleep(GATHER)
            last_batch_at = loop.time()
            self._pending.clear()
            records, self._records = self._records, []
            gone, self._gone = self._gone, []
            parked, self._parked = self._parked, []
            seen, self._seen = self._seen, []
            said_gone, self._gone_webhooks = self._gone_webhooks, set()
            handed, self._handed_back = self._handed_back, []
            if records or gone or parked or handed:
                try:
                    await self._write(records, gone, parked, handed)
                except Exception:  # never drop an outcome: put it back and try again soon
                    log.exception("recording attempts failed; will try again")
                    self._records[:0] = records
                    self._gone[:0] = gone
                    self._parked[:0] = parked
                    self._seen[:0] = seen
                    self._gone_webhooks |= said_gone
                    self._handed_back[:0] = handed
                    await asyncio.sleep(1.0)
                    self._pending.set()
                    continue
                self.on_written(_delivery_ids(records, gone, parked, handed))
                await self._judge(seen, said_gone)
            if not self._waiting():
                self._idle.set()

    async def _write(
        self,
        records: list[AttemptRecord],
        gone: list[str],
        parked: list[tuple[str, datetime]],
        handed: list[tuple[str, str]],
    ) -> None:
        async def write() -> None:
            # No transaction: each statement commits on its own and may be run again (a
            # retried write adds no attempt twice), and they concern different deliveries.
            async with self._pool.acquire() as conn:
                await record_attempts(conn, records)
                await end_deliveries(conn, gone, error=GONE)
                await park_deliveries(conn, [i for i, _ in parked], [u for _, u in parked])
                await hand_back_deliveries(conn, [i for i, _ in handed], [e for _, e in handed])

        try:
            await retry_transient(write, what="record attempts")
        except (asyncpg.PostgresError, ValueError):
            # Not an outage but a row Postgres refuses: free the claims so the deliveries are
            # attempted again rather than held by this worker until it restarts.
            log.exception("cannot record attempts; releasing their deliveries")
            ids = _delivery_ids(records, gone, parked, handed)
            await retry_transient(
                lambda: release_deliveries(self._pool, ids), what="release deliveries"
            )

    async def _judge(self, seen: list[Seen], said_gone: set[str]) -> None:
        """Note the webhooks' failing streaks; disable those that answered 410 Gone or have
        failed for `disable_after`. Every statement may run again (a retried write)."""
        if not seen:
            return

        async def judge() -> list[tuple[str, str]]:
            async with self._pool.acquire() as conn:
                failing = await note_streaks(
                    conn, streaks(seen), disable_after=self._settings.disable_after
                )
                disabled = [
                    (webhook_id, "gone")
                    for webhook_id in await disable_webhooks(conn, sorted(said_gone), "gone")
                ]
                failing = sorted((w, since) for w, since in failing if w not in said_gone)
                ids = await disable_webhooks(
                    conn,
                    [w for w, _ in failing],
                    "failing",
                    failing_since=[since for _, since in failing],
                )
                return disabled + [(webhook_id, "failing") for webhook_id in ids]

        try:
            disabled = await retry_transient(judge, what="note failing webhooks")
        except (asyncpg.PostgresError, ValueError):
            # The attempts are recorded; a webhook's streak is noted again by its next attempt.
            log.exception("cannot note failing webhooks")
            return
        for webhook_id, reason in disabled:
            self._metrics.webhooks_disabled_by(reason).inc()
            log.warning("webhook disabled", extra={"webhook_id": webhook_id, "reason": reason})

    async def close(self, wait_for_db: float = 10.0) -> None:
        """Write everything queued (waiting up to `wait_for_db` seconds), then stop."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(wait_for_db):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "attempt records not written before shutdown",
                extra={"records": len(self._records) + len(self._gone)},
            )
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None


def _delivery_ids(
    records: list[AttemptRecord],
    gone: list[str],
    parked: list[tuple[str, datetime]],
    handed: list[tuple[str, str]],
) -> list[str]:
    return [r.delivery_id for r in records] + gone + [i for i, _ in parked] + [i for i, _ in handed]

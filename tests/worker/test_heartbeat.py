"""The heartbeat: the retries gauges, and forgetting workers long gone."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import asyncpg

from engine.store.queue import release_lapsed
from tests.worker.conftest import StartWorker
from tests.worker.helpers import eventually, insert_pending


async def test_the_retries_gauges_count_the_backlog_from_the_first_beat(
    start_worker: StartWorker, pool: asyncpg.Pool[Any]
) -> None:
    tag = secrets.token_hex(4)
    # Waiting an hour: nothing this test runs can claim them or make them due.
    await insert_pending(
        pool,
        f"dlv_gauge_{tag}",
        3000,
        webhook_id="wh_gauge",
        account_id="acct_gauge",
        due_in=timedelta(hours=1),
    )
    # What else waits that long (earlier tests' rows) counts too; nearer retries may or may not.
    far = await pool.fetchval(
        """SELECT count(*) FROM deliveries
           WHERE status = 'pending' AND next_attempt_at > now() + interval '10 minutes'"""
    )
    pending = await pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'pending'")
    worker = await start_worker()

    def waiting() -> float:
        value = worker.metrics.registry.get_sample_value("cargolint_webhooks_retries_pending")
        return value or 0.0

    await eventually(lambda: waiting() >= far, timeout=10)
    assert far >= 3000
    assert far <= waiting() <= pending


async def test_a_long_silent_worker_is_forgotten_once_its_claims_are_released(
    pool: asyncpg.Pool[Any],
) -> None:
    tag = secrets.token_hex(4)
    gone, quiet, live = f"wrk_gone_{tag}", f"wrk_quiet_{tag}", f"wrk_live_{tag}"
    await pool.execute(
        """INSERT INTO workers (id, hostname, heartbeat_at) VALUES
               ($1, 'h', now() - interval '1 hour'),
               ($2, 'h', now() - interval '30 seconds'),
               ($3, 'h', now())""",
        gone,
        quiet,
        live,
    )
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type,
                                   next_attempt_at, claimed_by)
           VALUES ('dlv_forget_' || $1, 'wh_forget', 'acct_forget', 'evt_forget', 't',
                   now() + interval '1 hour', $2)""",
        tag,
        gone,
    )

    async def workers() -> set[str]:
        rows = await pool.fetch("SELECT id FROM workers WHERE id LIKE '%' || $1", tag)
        return {r["id"] for r in rows}

    assert await release_lapsed(pool, "wrk_me", lease=15.0) >= 1
    claimed = await pool.fetchval(
        "SELECT claimed_by FROM deliveries WHERE id = 'dlv_forget_' || $1", tag
    )
    assert claimed is None
    assert await workers() == {gone, quiet, live}  # it still held a claim as the beat began
    await release_lapsed(pool, "wrk_me", lease=15.0)
    # Silent for over ten leases and claiming nothing: forgotten. Silent for two: kept.
    assert await workers() == {quiet, live}

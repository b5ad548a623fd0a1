"""The heartbeat's reading of the retry backlog into the retries gauges."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg

from tests.worker.conftest import StartWorker
from tests.worker.helpers import eventually


async def test_the_retries_gauges_count_the_backlog_from_the_first_beat(
    start_worker: StartWorker, pool: asyncpg.Pool[Any]
) -> None:
    tag = secrets.token_hex(4)
    # Waiting an hour: nothing this test runs can claim them or make them due.
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type,
                                   next_attempt_at)
           SELECT 'dlv_gauge_' || $1 || g, 'wh_gauge', 'acct_gauge', 'evt_' || g, 't',
                  now() + interval '1 hour'
           FROM generate_series(1, 3000) g""",
        tag,
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

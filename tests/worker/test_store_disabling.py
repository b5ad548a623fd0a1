"""engine.store.disabling against the real database: failing streaks written only when they
change, and disabling (deactivate, end pending deliveries, NOTIFY) as one statement."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from engine.settings import Settings
from engine.store.db import NOTIFY_CHANNEL, connect
from engine.store.disabling import DISABLED, Streak, disable_webhooks, note_streaks
from tests.worker.helpers import insert_pending, make_account, make_webhook

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
DAY = 86400.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def _webhook(
    pool: asyncpg.Pool[Any], settings: Settings, failing_since: datetime | None
) -> tuple[str, str]:
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, settings, account, "https://example.com/hook")
    await pool.execute(
        "UPDATE webhooks SET failing_since = $2 WHERE id = $1", webhook_id, failing_since
    )
    return account, webhook_id


async def _failing_since(pool: asyncpg.Pool[Any], webhook_id: str) -> datetime | None:
    value: datetime | None = await pool.fetchval(
        "SELECT failing_since FROM webhooks WHERE id = $1", webhook_id
    )
    return value


@pytest.mark.parametrize(
    ("before", "ok_at", "first_failed", "last_failed", "after"),
    [
        (None, None, 10, 20, 10),  # the first failure starts the streak
        (None, 5, 10, 20, 10),
        (None, 30, None, None, None),  # healthy stays healthy
        (3, None, 10, 20, 3),  # still failing since the first one
        (3, 5, 10, 20, 10),  # a success in between started a new streak
        (3, 5, None, None, None),  # a success ends the streak
        # A success older than the failure another worker recorded leaves the streak alone.
        (8, 5, None, None, 8),
        (12, 5, 10, 20, 10),  # the earliest failure after the success counts
    ],
)
async def test_failing_since_follows_the_latest_success(
    *,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
    before: float | None,
    ok_at: float | None,
    first_failed: float | None,
    last_failed: float | None,
    after: float | None,
) -> None:
    def when(seconds: float | None) -> datetime | None:
        return None if seconds is None else at(seconds)

    _, webhook_id = await _webhook(pool, wsettings, when(before))
    xmin = await pool.fetchval("SELECT xmin::text FROM webhooks WHERE id = $1", webhook_id)
    streak = Streak(webhook_id, when(ok_at), when(first_failed), when(last_failed))
    due = await note_streaks(pool, [streak], disable_after=DAY)
    assert due == []
    assert await _failing_since(pool, webhook_id) == when(after)
    # A row is written only when its value changes: the hot path of a healthy webhook reads.
    rewritten = await pool.fetchval("SELECT xmin::text FROM webhooks WHERE id = $1", webhook_id)
    assert (rewritten != xmin) == (before != after)


async def test_a_failure_past_the_period_makes_the_webhook_due(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    _, long_failing = await _webhook(pool, wsettings, at(0))
    _, short_failing = await _webhook(pool, wsettings, at(0))
    _, recovered = await _webhook(pool, wsettings, at(0))
    due = await note_streaks(
        pool,
        [
            Streak(long_failing, None, at(DAY), at(DAY)),  # exactly the period: due
            Streak(short_failing, None, at(DAY - 1), at(DAY - 1)),
            Streak(recovered, at(DAY + 1), None, None),
        ],
        disable_after=DAY,
    )
    assert due == [(long_failing, at(0))]


async def test_disabling_ends_pending_deliveries_and_notifies(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    account, webhook_id = await _webhook(pool, wsettings, at(0))
    await insert_pending(pool, "dlv_dis_", 3, webhook_id=webhook_id, account_id=account)
    await pool.execute(
        "UPDATE deliveries SET status = 'succeeded' WHERE id = 'dlv_dis_1'",
    )
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await connect(wsettings.database_url)
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda *args: heard.put_nowait(args[3]))
        disabled = await disable_webhooks(pool, [webhook_id], "failing", failing_since=[at(0)])
        assert disabled == [webhook_id]
        async with asyncio.timeout(5):
            while await heard.get() != webhook_id:
                pass
    finally:
        await listener.close()
    row = await pool.fetchrow("SELECT * FROM webhooks WHERE id = $1", webhook_id)
    assert row is not None
    assert (row["active"], row["disabled_reason"]) == (False, "failing")
    assert row["disabled_at"] is not None
    assert row["updated_at"] == row["disabled_at"]
    ended = await pool.fetch(
        "SELECT id, status, error FROM deliveries WHERE webhook_id = $1 ORDER BY id", webhook_id
    )
    assert [(r["id"], r["status"], r["error"]) for r in ended] == [
        ("dlv_dis_1", "succeeded", None),
        ("dlv_dis_2", "failed", DISABLED),
        ("dlv_dis_3", "failed", DISABLED),
    ]
    # Once is enough: an inactive webhook is not disabled again (nor counted twice).
    assert await disable_webhooks(pool, [webhook_id], "gone") == []
    assert await pool.fetchval(
        "SELECT disabled_reason FROM webhooks WHERE id = $1", webhook_id
    ) == ("failing")


async def test_a_success_recorded_meanwhile_saves_the_webhook(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    _, webhook_id = await _webhook(pool, wsettings, at(0))
    # Another worker's success, then a new failure: failing since later than the due streak.
    await pool.execute("UPDATE webhooks SET failing_since = $2 WHERE id = $1", webhook_id, at(50))
    assert await disable_webhooks(pool, [webhook_id], "failing", failing_since=[at(0)]) == []
    await pool.execute("UPDATE webhooks SET failing_since = NULL WHERE id = $1", webhook_id)
    assert await disable_webhooks(pool, [webhook_id], "failing", failing_since=[at(0)]) == []
    assert await pool.fetchval("SELECT active FROM webhooks WHERE id = $1", webhook_id) is True

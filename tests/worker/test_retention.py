"""Retention against the real database: what a purge removes, what it keeps, one purger at a time.

Deliveries are made as the worker makes them (tests.api.deliveries.add_delivery) and dated back
by hand; the purge runs with a retention of 30 days, so "old" is 30 days and two hours and
"young" a minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from engine.core.events import Event
from engine.core.ids import delivery_id, new_id
from engine.settings import Settings, SettingsError
from engine.store.db import connect
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from engine.store.retention import PURGE_LOCK, purge_batch
from engine.worker.metrics import Metrics
from engine.worker.retention import Purger, pause_after
from tests.api.deliveries import add_delivery
from tests.conftest import with_
from tests.worker.conftest import StartWorker
from tests.worker.helpers import event_data, make_account, make_webhook

URL = "https://receiver.example/hook"
RETENTION = 30 * 86400.0
HOUR = 3600.0


def _ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def _old_deliveries(
    pool: asyncpg.Pool[Any], hook: str, account: str, statuses: Sequence[str]
) -> list[str]:
    """Finished deliveries of `hook`, created past the retention, each a second older."""
    return [
        await add_delivery(
            pool,
            hook,
            account,
            mode="live",
            status=status,
            attempts=1,
            created_at=_ago(RETENTION + 2 * HOUR + i),
        )
        for i, status in enumerate(statuses)
    ]


async def _attempt(pool: asyncpg.Pool[Any], dlv: str, number: int = 1) -> None:
    await pool.execute(
        """INSERT INTO delivery_attempts (delivery_id, number, attempted_at, response_status)
           VALUES ($1, $2, now(), 200)""",
        dlv,
        number,
    )


async def _present(pool: asyncpg.Pool[Any], ids: list[str]) -> set[str]:
    rows = await pool.fetch("SELECT id FROM deliveries WHERE id = ANY($1::text[])", ids)
    return {r["id"] for r in rows}


async def _attempts(pool: asyncpg.Pool[Any], ids: list[str]) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE delivery_id = ANY($1::text[])", ids
    )
    return count


async def _event_kept(pool: asyncpg.Pool[Any], account_id: str, dlv: str) -> bool:
    kept: bool = await pool.fetchval(
        """SELECT EXISTS (SELECT 1 FROM events e
                          WHERE e.account_id = $1
                            AND e.id = (SELECT event_id FROM deliveries WHERE id = $2))""",
        account_id,
        dlv,
    )
    return kept


async def _event_exists(pool: asyncpg.Pool[Any], account_id: str, event_id: str) -> bool:
    exists: bool = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM events WHERE account_id = $1 AND id = $2)",
        account_id,
        event_id,
    )
    return exists


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"cargolint_webhooks_{name}", labels)
    assert value is not None, name
    return value


@pytest.fixture(autouse=True)
async def _nothing_old_left(pool: asyncpg.Pool[Any], settings: Settings) -> None:
    """Earlier tests of the session may have dated deliveries back: purge them first, so each
    test counts only its own rows."""
    await _drain(_purger(settings))


def _purger(settings: Settings, metrics: Metrics | None = None, **kwargs: Any) -> Purger:
    return Purger(with_(settings, retention=RETENTION), metrics=metrics or Metrics(), **kwargs)


async def _drain(purger: Purger) -> int:
    """Run until nothing is left; return the deliveries removed."""
    removed = 0
    while True:
        result = await purger.run_once()
        assert result.held
        removed += result.removed.deliveries
        if not result.more:
            return removed


async def _shared_event(
    pool: asyncpg.Pool[Any], account_id: str, webhook_ids: list[str]
) -> tuple[str, list[str]]:
    """One event delivered to several webhooks; return its id and the delivery ids."""
    event = Event(
        id=new_id("evt"),
        type="document.uploaded",
        account_id=account_id,
        mode="live",
        timestamp="2026-03-02T11:45:00Z",
        data=orjson.dumps(event_data("document.uploaded")),
    )
    ids = [delivery_id(w, account_id, event.id) for w in webhook_ids]
    await insert_events_and_deliveries(
        pool,
        [event],
        [NewDelivery(i, w, event) for i, w in zip(ids, webhook_ids, strict=True)],
        claimed_by=None,
    )
    return event.id, ids


async def test_old_finished_deliveries_go_with_their_attempts_and_events(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = await _old_deliveries(pool, hook, account, ("succeeded", "failed", "failed"))
    old_pending = await add_delivery(
        pool,
        hook,
        account,
        mode="live",
        status="pending",
        attempts=3,
        created_at=_ago(RETENTION + 90 * HOUR),
    )
    young = await add_delivery(
        pool, hook, account, mode="live", status="succeeded", attempts=1, created_at=_ago(60)
    )
    # Just inside the retention: kept.
    edge = await add_delivery(
        pool,
        hook,
        account,
        mode="live",
        status="failed",
        attempts=1,
        created_at=_ago(RETENTION - 60),
    )
    for d in [*old, old_pending, young, edge]:
        await _attempt(pool, d)
    metrics = Metrics()

    result = await _purger(settings, metrics).run_once()

    assert result.held
    assert result.removed.deliveries == 3
    assert result.removed.attempts == 3
    assert result.removed.events == 3
    assert await _present(pool, [*old, old_pending, young, edge]) == {old_pending, young, edge}
    assert await _attempts(pool, old) == 0
    assert await _attempts(pool, [old_pending, young, edge]) == 3
    for d in (old_pending, young, edge):
        assert await _event_kept(pool, account, d)
    assert _sample(metrics, "retention_removed_total", table="deliveries") == 3
    assert _sample(metrics, "retention_removed_total", table="delivery_attempts") == 3
    assert _sample(metrics, "retention_removed_total", table="events") == 3
    # The oldest finished delivery left is the one just inside the retention.
    assert RETENTION - 120 < _sample(metrics, "retention_oldest_kept_seconds") < RETENTION


async def test_an_event_stays_while_another_webhooks_delivery_needs_it(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    account = await make_account(pool)
    hooks = [(await make_webhook(pool, settings, account, URL))[0] for _ in range(3)]
    # a: all three deliveries old and finished → the event goes with them.
    a_event, a = await _shared_event(pool, account, hooks)
    # b: one delivery still pending → the event stays, the finished two go.
    b_event, b = await _shared_event(pool, account, hooks)
    # c: one delivery young (a later webhook's delivery of a republished event) → stays.
    c_event, c = await _shared_event(pool, account, hooks)
    await pool.execute(
        """UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL,
                  created_at = now() - interval '31 days'
           WHERE id = ANY($1::text[])""",
        [*a, *b[:2], *c[:2]],
    )
    await pool.execute(
        "UPDATE deliveries SET created_at = now() - interval '31 days' WHERE id = $1", b[2]
    )
    await pool.execute(
        "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL WHERE id = $1", c[2]
    )

    assert await _drain(_purger(settings)) == 7

    assert await _present(pool, [*a, *b, *c]) == {b[2], c[2]}
    assert not await _event_exists(pool, account, a_event)
    assert await _event_exists(pool, account, b_event)
    assert await _event_exists(pool, account, c_event)


async def test_batches_reach_everything_old(pool: asyncpg.Pool[Any], settings: Settings) -> None:
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = await _old_deliveries(pool, hook, account, ["succeeded"] * 7)
    purger = _purger(settings, batch=3, budget=0.0)  # one batch per run

    first = await purger.run_once()
    assert first.removed.deliveries == 3
    assert first.more
    assert await _drain(purger) == 4
    assert await _present(pool, old) == set()


async def test_a_purge_in_progress_elsewhere_makes_a_run_skip(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = await _old_deliveries(pool, hook, account, ["failed"] * 4)
    other = await connect(settings.database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", PURGE_LOCK)
        skipped = await _purger(settings).run_once()
        assert not skipped.held
        assert skipped.removed.deliveries == 0
        assert await _present(pool, old) == set(old)
    finally:
        await other.close()
    assert (await _purger(settings).run_once()).removed.deliveries == 4


async def test_two_purgers_racing_remove_each_row_once(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = await _old_deliveries(pool, hook, account, ["succeeded"] * 40)
    for d in old:
        await _attempt(pool, d)
    one, two = _purger(settings, batch=5), _purger(settings, batch=5)
    # The first run is held inside its first batch (its DELETE of attempts waits for this
    # table lock) with the purge lock taken; the second runs meanwhile.
    blocker = await connect(settings.database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE delivery_attempts IN SHARE MODE")
            first = asyncio.create_task(one.run_once())
            while not await pool.fetchval(
                """SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d
                                      ON d.oid = l.database
                                  WHERE l.locktype = 'advisory' AND l.granted
                                    AND d.datname = current_database())"""
            ):
                await asyncio.sleep(0.01)
            second = await two.run_once()
        held = await first
    finally:
        await blocker.close()

    assert not second.held
    assert second.removed.deliveries == 0
    assert held.held
    assert held.removed.deliveries == 40
    assert held.removed.attempts == 40
    assert await _present(pool, old) == set()


async def _waiting_on_a_lock(pool: asyncpg.Pool[Any], conn: asyncpg.Connection[Any]) -> bool:
    """Whether `conn`'s statement is waiting for a lock another transaction holds."""
    waiting: bool = await pool.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
        conn.get_server_pid(),
    )
    return waiting


async def _until_waiting_or_done(
    pool: asyncpg.Pool[Any], conn: asyncpg.Connection[Any], task: asyncio.Task[Any]
) -> None:
    while not task.done() and not await _waiting_on_a_lock(pool, conn):
        await asyncio.sleep(0.01)


async def _old_delivered_event(
    pool: asyncpg.Pool[Any], account: str, hook: str
) -> tuple[Event, str]:
    """An event delivered to `hook` and finished past the retention; the event and delivery."""
    event_id, (dlv,) = await _shared_event(pool, account, [hook])
    await pool.execute(
        """UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL,
                  created_at = now() - interval '31 days'
           WHERE id = $1""",
        dlv,
    )
    await _attempt(pool, dlv)
    row = await pool.fetchrow(
        "SELECT * FROM events WHERE account_id = $1 AND id = $2", account, event_id
    )
    assert row is not None
    event = Event(
        id=event_id,
        type=row["type"],
        account_id=account,
        mode=row["mode"],
        timestamp=row["timestamp"],
        data=bytes(row["data"]),
    )
    return event, dlv


async def test_a_delivery_made_while_the_purge_removes_its_events_last_one_keeps_the_event(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    # The event is republished and now matches a webhook made since: its new delivery is
    # written (not yet committed) while a purge removes the event's only other delivery. The
    # purge must not remove the event the new delivery carries: without it, it is never sent.
    account = await make_account(pool)
    first, _ = await make_webhook(pool, settings, account, URL)
    event, old = await _old_delivered_event(pool, account, first)
    later, _ = await make_webhook(pool, settings, account, URL)
    new = delivery_id(later, account, event.id)
    ingest, purge = await connect(settings.database_url), await connect(settings.database_url)
    try:
        async with ingest.transaction():
            made = await insert_events_and_deliveries(
                ingest, [event], [NewDelivery(new, later, event)], claimed_by=None
            )
            assert made == {new}
            purging = asyncio.create_task(purge_batch(purge, _ago(RETENTION), 1000))
            # The purge either ends or waits for the ingest to commit.
            await _until_waiting_or_done(pool, purge, purging)
        removed = await purging
    finally:
        await ingest.close()
        await purge.close()

    assert removed.deliveries == 1
    assert await _present(pool, [old, new]) == {new}
    assert await _event_exists(pool, account, event.id)


async def test_an_event_republished_while_the_purge_removes_its_delivery_is_delivered_again(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    # The other order, for the same webhook: the purge has removed the delivery (not yet
    # committed) when the republished event's ingest, which makes the same delivery id, comes.
    # It waits for the purge, and then makes the delivery and the event anew.
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    event, dlv = await _old_delivered_event(pool, account, hook)
    blocker = await connect(settings.database_url)
    ingest, purge = await connect(settings.database_url), await connect(settings.database_url)
    try:
        async with blocker.transaction():
            # Holds the purge inside its batch: its DELETE of the attempts waits for this lock.
            await blocker.execute(
                "SELECT 1 FROM delivery_attempts WHERE delivery_id = $1 FOR UPDATE", dlv
            )
            purging = asyncio.create_task(purge_batch(purge, _ago(RETENTION), 1000))
            await _until_waiting_or_done(pool, purge, purging)
            assert not purging.done()
            inserting = asyncio.create_task(
                insert_events_and_deliveries(
                    ingest, [event], [NewDelivery(dlv, hook, event)], claimed_by=None
                )
            )
            await _until_waiting_or_done(pool, ingest, inserting)
            assert not inserting.done()
        removed = await purging
        made = await inserting
    finally:
        await blocker.close()
        await ingest.close()
        await purge.close()

    assert removed.deliveries == 1
    assert removed.events == 1
    assert made == {dlv}
    row = await pool.fetchrow("SELECT status, attempts FROM deliveries WHERE id = $1", dlv)
    assert row is not None
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert await _event_exists(pool, account, event.id)


@pytest.mark.slow
async def test_a_worker_purges_on_start(
    pool: asyncpg.Pool[Any], start_worker: StartWorker, settings: Settings
) -> None:
    # What earlier tests left finished goes first, so the worker's first run is about this.
    while (await Purger(with_(settings, retention=1.0), metrics=Metrics()).run_once()).more:
        pass
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = await add_delivery(
        pool, hook, account, mode="live", status="failed", attempts=1, created_at=_ago(5)
    )
    kept = await add_delivery(pool, hook, account, mode="live", status="pending")

    worker = await start_worker(retention=2.0)

    for _ in range(300):
        if not await _present(pool, [old]):
            break
        await asyncio.sleep(0.1)
    assert await _present(pool, [old, kept]) == {kept}
    assert _sample(worker.metrics, "retention_removed_total", table="deliveries") >= 1


async def test_of_two_workers_purging_each_old_row_is_removed_once(
    pool: asyncpg.Pool[Any], start_worker: StartWorker, settings: Settings
) -> None:
    # Two workers of one fleet, both running the purge loop: one run at a time holds the lock,
    # so together they remove each old row once and count it once.
    while (await Purger(with_(settings, retention=1.0), metrics=Metrics()).run_once()).more:
        pass
    account = await make_account(pool)
    hook, _ = await make_webhook(pool, settings, account, URL)
    old = [
        await add_delivery(
            pool, hook, account, mode="live", status="succeeded", attempts=1, created_at=_ago(5)
        )
        for _ in range(30)
    ]
    kept = await add_delivery(pool, hook, account, mode="live", status="pending")

    workers = [await start_worker(retention=2.0) for _ in range(2)]

    for _ in range(300):
        if not await _present(pool, old):
            break
        await asyncio.sleep(0.1)
    assert await _present(pool, [*old, kept]) == {kept}
    counted = [_sample(w.metrics, "retention_removed_total", table="deliveries") for w in workers]
    assert sum(counted) == len(old)


@pytest.mark.parametrize("raw", ["0", "0s", "soon", "-1d", "3 weeks"])
def test_a_bad_retention_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="CARGOLINT_RETENTION"):
        Settings.from_env({"CARGOLINT_RETENTION": raw})


@pytest.mark.parametrize(
    ("raw", "seconds"), [("", 30 * 86400.0), ("30d", 30 * 86400.0), ("2s", 2.0), ("90m", 5400.0)]
)
def test_retention_durations(raw: str, seconds: float) -> None:
    assert Settings.from_env({"CARGOLINT_RETENTION": raw}).retention == seconds


@pytest.mark.parametrize("raw", ["0", "-0.5", "1.5", "a tenth", "nan"])
def test_a_bad_purge_share_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="CARGOLINT_PURGE_SHARE"):
        Settings.from_env({"CARGOLINT_PURGE_SHARE": raw})


@pytest.mark.parametrize(
    ("batch_seconds", "share", "pause"),
    [(0.2, 0.1, 1.8), (0.2, 1.0, 0.0), (0.3, 0.5, 0.3), (0.0, 0.1, 0.0)],
)
def test_the_purge_pauses_to_keep_to_its_share(
    batch_seconds: float, share: float, pause: float
) -> None:
    assert pause_after(batch_seconds, share) == pytest.approx(pause)
    assert Settings.from_env({"CARGOLINT_PURGE_SHARE": str(share)}).purge_share == share

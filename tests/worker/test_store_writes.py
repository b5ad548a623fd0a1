"""The worker's batched writes: one statement each, safe to run twice; migration 0003."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from engine.core.events import parse_event
from engine.core.ids import delivery_id, random_token
from engine.settings import Settings
from engine.store.deliveries import (
    AttemptRecord,
    NewDelivery,
    insert_events_and_deliveries,
    record_attempts,
)
from engine.store.migrate import migrate, migration_files
from tests.conftest import PG_ADMIN
from tests.worker.helpers import make_account, make_event, make_webhook

NOW = datetime(2026, 3, 2, 11, 45, tzinfo=UTC)


def attempt(dlv: str, number: int, status: str, next_at: datetime | None) -> AttemptRecord:
    return AttemptRecord(
        delivery_id=dlv,
        number=number,
        attempted_at=NOW + timedelta(seconds=number),
        response_status=500 if status != "succeeded" else 200,
        response_time_ms=12,
        error_class=None if status == "succeeded" else "http_status",
        error=None if status == "succeeded" else "HTTP 500",
        response_body="body",
        status=status,
        next_attempt_at=next_at,
    )


async def test_events_and_deliveries_go_in_once_without_a_transaction(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    account = await make_account(pool)
    hooks = [
        (await make_webhook(pool, wsettings, account, "https://example.com/a"))[0] for _ in range(3)
    ]
    event = parse_event(orjson.dumps(make_event(account)))
    new = [NewDelivery(delivery_id(h, account, event.id), h, event) for h in hooks]

    first = await insert_events_and_deliveries(pool, [event], new, claimed_by="wrk_t")
    again = await insert_events_and_deliveries(pool, [event], new, claimed_by="wrk_t")

    assert first == {d.id for d in new}
    assert again == set()
    stored = await pool.fetchrow(
        "SELECT data, timestamp FROM events WHERE account_id = $1 AND id = $2", account, event.id
    )
    assert stored is not None
    assert bytes(stored["data"]) == event.data
    claimed = await pool.fetch(
        "SELECT claimed_by FROM deliveries WHERE id = ANY($1::text[])", [d.id for d in new]
    )
    assert [r["claimed_by"] for r in claimed] == ["wrk_t"] * 3


async def test_recording_the_same_attempts_twice_adds_nothing(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, "https://example.com/a")
    events = [parse_event(orjson.dumps(make_event(account))) for _ in range(2)]
    ids = [delivery_id(webhook_id, account, e.id) for e in events]
    await insert_events_and_deliveries(
        pool,
        events,
        [NewDelivery(i, webhook_id, e) for i, e in zip(ids, events, strict=True)],
        claimed_by="wrk_t",
    )
    retry_at = NOW + timedelta(minutes=5)
    batch = [attempt(ids[0], 1, "pending", retry_at), attempt(ids[1], 1, "succeeded", None)]

    await record_attempts(pool, batch)
    await record_attempts(pool, batch)  # as after a lost commit acknowledgement

    rows = await pool.fetch(
        "SELECT delivery_id, number FROM delivery_attempts WHERE delivery_id = ANY($1::text[])",
        ids,
    )
    assert sorted((r["delivery_id"], r["number"]) for r in rows) == sorted((i, 1) for i in ids)
    state = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, status, attempts, next_attempt_at, claimed_by FROM deliveries"
            " WHERE id = ANY($1::text[])",
            ids,
        )
    }
    assert state[ids[0]]["status"] == "pending"
    assert state[ids[0]]["next_attempt_at"] == retry_at
    assert state[ids[0]]["claimed_by"] is None
    assert state[ids[1]]["status"] == "succeeded"
    assert state[ids[1]]["attempts"] == 1


@pytest.mark.slow
async def test_migration_0003_keeps_the_first_of_duplicate_attempts() -> None:
    name = f"cargolint_test_{random_token(10)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(url)
        try:
            # The schema as it was before 0003, with the duplicates it allowed.
            await conn.execute(
                """CREATE TABLE schema_migrations (
                       name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            for migration, sql in migration_files():
                if migration < "0003":
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (name) VALUES ($1)", migration
                    )
            await conn.execute(
                """INSERT INTO accounts (id, name, plan) VALUES ('acct_1', 'a', 'business');
                   INSERT INTO webhooks (id, account_id, mode, url, events, secret)
                   VALUES ('wh_1', 'acct_1', 'live', 'https://example.com', '{}', 'plain:s');
                   INSERT INTO events (account_id, id, mode, type, "timestamp", data)
                   VALUES ('acct_1', 'evt_1', 'live', 'document.uploaded', 't', '\\x7b7d');
                   INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type)
                   VALUES ('dlv_1', 'wh_1', 'acct_1', 'evt_1', 'document.uploaded');
                   INSERT INTO delivery_attempts (delivery_id, number, attempted_at, error)
                   VALUES ('dlv_1', 1, now(), 'first'), ('dlv_1', 1, now(), 'copy'),
                          ('dlv_1', 2, now(), 'second'), ('dlv_1', 1, now(), 'copy')"""
            )

            assert await migrate(url) == [m for m, _ in migration_files() if m >= "0003"]

            rows = await conn.fetch("SELECT number, error FROM delivery_attempts ORDER BY number")
            assert [(r["number"], r["error"]) for r in rows] == [(1, "first"), (2, "second")]
            unique = await conn.fetchval(
                """SELECT indisunique FROM pg_index
                   WHERE indexrelid = 'delivery_attempts_number'::regclass"""
            )
            assert unique is True
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

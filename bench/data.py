"""Accounts and webhooks written straight into Postgres with COPY, and delivery counts read back.

The API is not what the benchmark measures, so scenarios insert their subscriptions directly
(the `accounts` and `webhooks` tables of 0001_initial.sql). Each signing secret is sealed with
`SECRET_KEY`, which the benchmark's workers hold, as in production (CARGOLINT_SECRET_KEY set).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.fernet import Fernet

from bench.payload import EVENT_TYPE, SECRET
from engine.core.crypto import SecretBox

__all__ = [
    "SECRET_KEY",
    "Counts",
    "Webhook",
    "checkpoint",
    "checkpoints_started",
    "counts",
    "insert_webhooks",
    "settle",
    "vacuum",
    "wait_settled",
]

SECRET_KEY = Fernet.generate_key().decode()  # this run's CARGOLINT_SECRET_KEY


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    account_id: str
    url: str


def webhook_id(prefix: str, n: int) -> str:
    """`wh_` + [a-z0-9]: the prefix (letters) names the scenario, the number makes it unique."""
    return f"wh_{prefix}{n:012d}"


async def insert_webhooks(pool: asyncpg.Pool[Any], webhooks: Sequence[Webhook]) -> None:
    """COPY the webhooks and their (business plan, live mode) accounts in."""
    accounts = sorted({w.account_id for w in webhooks})
    box = SecretBox((SECRET_KEY,))
    # Sealed one by one, as the API does: every row its own token, none opened in advance.
    sealed = [box.seal(SECRET) for _ in webhooks]
    async with pool.acquire() as conn, conn.transaction():
        await conn.copy_records_to_table(
            "accounts",
            records=[(a, f"bench {a}", "business") for a in accounts],
            columns=["id", "name", "plan"],
        )
        await conn.copy_records_to_table(
            "webhooks",
            records=[
                (w.id, w.account_id, "live", w.url, [EVENT_TYPE], True, secret)
                for w, secret in zip(webhooks, sealed, strict=True)
            ],
            columns=["id", "account_id", "mode", "url", "events", "active", "secret"],
        )


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    succeeded: int
    failed: int
    pending: int


async def counts(pool: asyncpg.Pool[Any], webhook_ids: Sequence[str]) -> Counts:
    """Delivery records of these webhooks by status (served by deliveries_by_webhook)."""
    row = await pool.fetchrow(
        """SELECT count(*) AS total,
                  count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                  count(*) FILTER (WHERE status = 'failed') AS failed,
                  count(*) FILTER (WHERE status = 'pending') AS pending
           FROM deliveries WHERE webhook_id = ANY($1::text[])""",
        list(webhook_ids),
    )
    assert row is not None
    return Counts(row["total"], row["succeeded"], row["failed"], row["pending"])


async def wait_settled(
    pool: asyncpg.Pool[Any],
    webhook_ids: Sequence[str],
    expected: int,
    within: float,
    interval: float = 0.05,
) -> tuple[Counts, float]:
    """Poll until `expected` records of these webhooks are succeeded, or `within` seconds pass.

    Returns the last counts and the wall-clock time (time.time()) they were read.
    """
    deadline = time.monotonic() + within
    seen = await counts(pool, webhook_ids)
    while seen.succeeded < expected and time.monotonic() < deadline:
        await asyncio.sleep(interval)
        seen = await counts(pool, webhook_ids)
    return seen, time.time()


async def settle(pool: asyncpg.Pool[Any]) -> int:
    """End every pending delivery as failed, so the next scenario's worker has no retries to do."""
    result = await pool.execute(
        """UPDATE deliveries SET status = 'failed', next_attempt_at = NULL, claimed_by = NULL,
                  error = coalesce(error, 'ended by the benchmark between scenarios')
           WHERE status = 'pending'"""
    )
    return int(result.split()[-1])


async def vacuum(pool: asyncpg.Pool[Any]) -> None:
    """Do what autovacuum would have done by now: clear the hot tables' dead row versions.

    Every delivery is inserted `pending` and rewritten when it ends, so each scenario leaves
    one dead version per delivery, and the pending-only indexes an entry for each. This
    machine's Postgres runs with autovacuum off, so without this every scenario paid for the
    garbage of all the ones before it — the worker's heartbeat scans the pending index, and
    until the worker's updates by id stopped matching that index (`STILL_PENDING`) so did
    every recorder write: the latency scenario run after throughput's 60,000 deliveries had
    p99s of 147-271 ms where, vacuumed first, it had 32-130 ms (four runs each, interleaved,
    before that change).
    """
    await pool.execute("VACUUM (ANALYZE) deliveries, delivery_attempts, events")


async def checkpoint(pool: asyncpg.Pool[Any]) -> None:
    """Write every dirty page now, so no scenario inherits the earlier ones' checkpoint.

    A full run writes about half a gigabyte of WAL in two minutes, most of it in the pre-filled
    rounds, and Postgres (max_wal_size 1 GB here) starts a checkpoint after about 530 MB of it:
    at the same point of every run, around the latency scenario. For a while after a checkpoint
    starts, the first write to each page logs the whole page (full_page_writes), and every
    commit waits for more WAL; the two runs in which such a checkpoint began around the latency
    scenario had latency p99 of 203 and 64 ms (p50 23 ms; the exact overlap was not recorded).
    With one between scenarios, a checkpoint during a paced measurement is one its own writes
    or the 5-minute timer started; `<scenario>_checkpoints` in the extras says whether one did.
    """
    await pool.execute("CHECKPOINT")


async def checkpoints_started(pool: asyncpg.Pool[Any]) -> int:
    """How many checkpoints Postgres has started (timed and requested) since its statistics
    were last reset."""
    return int(
        await pool.fetchval("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
    )

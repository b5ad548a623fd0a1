"""Retention: removing finished deliveries older than `CARGOLINT_RETENTION`, with their attempts
and the events no remaining delivery needs.

A purge runs on one connection and one worker at a time (a session advisory lock), in small
batches, each its own short transaction: the oldest finished deliveries first, read from the
`deliveries_finished` index (migration 0014). Pending deliveries are never removed, however old.

Events are keyed (account, event id) and shared by the deliveries of several webhooks; the row is
also what makes a republished event a no-op. An event goes with the last delivery that needs it:
a batch locks its events before it looks for deliveries still needing them, and the ingest of a
republished event locks the event it finds, so a delivery made meanwhile is either seen here or
finds the event gone and inserts it anew (docs/retention.md).
Its other deliveries, if any, have ids derived from (webhook, account, event) for a webhook of
the account (webhooks are deleted softly, so every one that ever had a delivery is still there):
they are looked up by primary key, with no index by event on the hot tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine.core.ids import delivery_id
from engine.store.delivery_counts import Removal, subtract

__all__ = [
    "PURGE_LOCK",
    "Removed",
    "oldest_finished",
    "purge_batch",
    "try_purge_lock",
]

PURGE_LOCK = 0x6361_7267_7265_74  # "cargret": the purge's advisory lock key
# How many candidate delivery ids one look-up for an event's other deliveries may carry.
_SIBLING_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class Removed:
    """Rows one batch removed, by table."""

    deliveries: int = 0
    attempts: int = 0
    events: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(
            self.deliveries + other.deliveries,
            self.attempts + other.attempts,
            self.events + other.events,
        )


async def try_purge_lock(conn: asyncpg.Connection[Any]) -> bool:
    """Take the purge's session lock on `conn` if no other session holds it; it is held until
    `conn` is closed."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", PURGE_LOCK))


# The key and predicate of deliveries_finished (migration 0014), spelt as there.
_UTC = "(created_at AT TIME ZONE 'UTC')"
_FINISHED = "(status IN ('succeeded', 'failed')) IS TRUE"

# FOR UPDATE: a resend that makes one of them pending again waits for this batch (and then
# finds nothing), or, done first, takes the row out of the batch (re-checked after the wait).
# SKIP LOCKED: rows being written to now are left for the next batch.
_PICK_DELIVERIES = f"""
    SELECT id, account_id, event_id FROM deliveries
    WHERE {_FINISHED} AND {_UTC} < ($1::timestamptz AT TIME ZONE 'UTC')
    ORDER BY {_UTC}
    LIMIT $2
    FOR UPDATE SKIP LOCKED"""

# Before anything is removed: an ingest that found one of these events (and locked it, see
# engine/store/deliveries.py) commits its deliveries first, so the look-up for deliveries still
# needing the event sees them; a later one waits for this batch, and finding the event gone
# inserts it anew. Locked in the order the ingest locks events, so the two never deadlock.
_LOCK_EVENTS = """
    SELECT 1 FROM events e
    JOIN unnest($1::text[], $2::text[]) AS k(account_id, id)
        ON e.account_id = k.account_id AND e.id = k.id
    ORDER BY e.account_id COLLATE "C", e.id COLLATE "C"
    FOR UPDATE OF e"""

_DELETE_DELIVERIES = """
    DELETE FROM deliveries d
    WHERE d.id = ANY($1::text[]) AND d.status IN ('succeeded', 'failed')
    RETURNING d.id, d.account_id, d.event_id, d.webhook_id, d.created_at, d.status, d.event_type"""


async def purge_batch(conn: asyncpg.Connection[Any], cutoff: datetime, limit: int) -> Removed:
    """Remove up to `limit` finished deliveries created before `cutoff`, their attempts, and the
    events none of the deliveries left needs, in one transaction."""
    async with conn.transaction():
        picked = await conn.fetch(_PICK_DELIVERIES, cutoff, limit)
        if not picked:
            return Removed()
        keys = sorted({(r["account_id"], r["event_id"]) for r in picked})
        await conn.execute(_LOCK_EVENTS, [k[0] for k in keys], [k[1] for k in keys])
        rows = await conn.fetch(_DELETE_DELIVERIES, [r["id"] for r in picked])
        if not rows:
            return Removed()
        ids = [r["id"] for r in rows]
        await subtract(
            conn,
            [Removal(r["webhook_id"], r["created_at"], r["status"], r["event_type"]) for r in rows],
        )
        attempts = await conn.execute(
            "DELETE FROM delivery_attempts WHERE delivery_id = ANY($1::text[])", ids
        )
        gone = {(r["account_id"], r["event_id"]) for r in rows}
        needed = await _still_needed(conn, gone)
        unneeded = sorted(gone - needed)
        events = await conn.execute(
            """DELETE FROM events e
               USING unnest($1::text[], $2::text[]) AS k(account_id, id)
               WHERE e.account_id = k.account_id AND e.id = k.id""",
            [k[0] for k in unneeded],
            [k[1] for k in unneeded],
        )
    return Removed(len(rows), _count(attempts), _count(events))


async def _still_needed(
    conn: asyncpg.Connection[Any], keys: Iterable[tuple[str, str]]
) -> set[tuple[str, str]]:
    """The (account, event) keys some remaining delivery still refers to."""
    by_account: dict[str, list[str]] = {}
    for account_id, event_id in keys:
        by_account.setdefault(account_id, []).append(event_id)
    rows = await conn.fetch(
        "SELECT account_id, id FROM webhooks WHERE account_id = ANY($1::text[])",
        list(by_account),
    )
    hooks: dict[str, list[str]] = {}
    for r in rows:
        hooks.setdefault(r["account_id"], []).append(r["id"])
    needed: set[tuple[str, str]] = set()
    candidates: list[str] = []
    for account_id, event_ids in by_account.items():
        for event_id in event_ids:
            candidates.extend(
                delivery_id(w, account_id, event_id) for w in hooks.get(account_id, ())
            )
            if len(candidates) >= _SIBLING_CHUNK:
                needed |= await _referenced(conn, candidates)
                candidates = []
    if candidates:
        needed |= await _referenced(conn, candidates)
    return needed


async def _referenced(
    conn: asyncpg.Connection[Any], delivery_ids: Sequence[str]
) -> set[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT account_id, event_id FROM deliveries WHERE id = ANY($1::text[])",
        list(delivery_ids),
    )
    return {(r["account_id"], r["event_id"]) for r in rows}


async def oldest_finished(conn: asyncpg.Connection[Any]) -> datetime | None:
    """When the oldest finished delivery still kept was created (None: there is none)."""
    value: datetime | None = await conn.fetchval(
        f"SELECT created_at FROM deliveries WHERE {_FINISHED} ORDER BY {_UTC} LIMIT 1"
    )
    return value


def _count(status: str) -> int:
    """Rows a `DELETE n` command status names."""
    return int(status.rsplit(maxsplit=1)[-1])

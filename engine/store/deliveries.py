"""Events, deliveries and attempts: batched writes for the worker, reads for the API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from engine.core.events import Event
from engine.core.times import rfc3339
from engine.store.db import Conn
from engine.store.delivery_counts import page_start

# Conn is in __all__ for engine.store.resending, which imports it from here.
__all__ = [
    "EXACT_TOTAL",
    "RECORD_COLUMNS",
    "STILL_PENDING",
    "AttemptRecord",
    "Conn",
    "DeliveryFilter",
    "NewDelivery",
    "delivery_json",
    "get_delivery",
    "insert_events_and_deliveries",
    "list_deliveries",
    "record_attempts",
]

# A delivery found by id is still pending: written so that Postgres finds the rows by their
# primary key. Spelt `d.status = 'pending'`, it matches the pending-only indexes' predicate,
# and with the few pending rows it expects Postgres reads the whole of one of them instead,
# dead entries included: a park of 20 deliveries took 29.7 ms that way with 130,000 ended
# deliveries since the last vacuum, 1.9 ms by key; during the benchmark's isolation run these
# statements took 20-50 ms each. The CHECK constraint on status makes the two forms equal.
STILL_PENDING = "d.status NOT IN ('succeeded', 'failed')"

# The columns of a delivery record (`delivery_json`).
RECORD_COLUMNS = """id, webhook_id, event_id, event_type, status, attempts, response_status,
    response_time_ms, error, created_at, last_attempt_at, next_attempt_at"""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to create: the (event, webhook) pair and its deterministic id.

    `endpoint` is its webhook's endpoint (`engine.worker.admission.endpoint_key`). `claimed`:
    the inserting worker claims it (it sends to that endpoint and has room); if not, it is
    created unclaimed for the endpoint's lease holder. `park_for` > 0: created unclaimed,
    first due that many seconds from now (a failing endpoint's backlog beyond what its worker
    holds in memory, see `Dispatcher.place`).
    """

    id: str
    webhook_id: str
    event: Event
    is_test: bool = False
    park_for: float = 0.0
    endpoint: str | None = None
    claimed: bool = True


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One finished attempt and the delivery state it leads to.

    `status` is the delivery's new status; `next_attempt_at` is set when a retry is scheduled.
    """

    delivery_id: str
    number: int
    attempted_at: datetime
    response_status: int | None
    response_time_ms: int | None
    error_class: str | None
    error: str | None
    response_body: str | None
    status: str
    next_attempt_at: datetime | None


_EVENT_ROWS = """INSERT INTO events (account_id, id, mode, type, "timestamp", data)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[])"""

_INSERT_EVENTS = f"{_EVENT_ROWS} ON CONFLICT DO NOTHING"

# With deliveries, an event already there is locked (ON CONFLICT DO UPDATE locks the row it
# finds even when its WHERE updates nothing) until the deliveries are committed: the retention
# purge locks an event before it looks for deliveries still needing it and removes it, so it
# either waits and sees the new deliveries, or removes the event first and this inserts it
# anew. Only a republished event pays the lock; its rows arrive sorted (`_events`), in the
# order the purge locks them too.
_INSERT_EVENTS_LOCKING = (
    f"{_EVENT_ROWS} ON CONFLICT (account_id, id) DO UPDATE SET type = events.type WHERE false"
)

# One statement, so one round trip and no BEGIN/COMMIT: the events go in through a
# data-modifying CTE, and a refused event refuses its deliveries with it (all or nothing).
_INSERT_EVENTS_AND_DELIVERIES = f"""WITH ev AS ({_INSERT_EVENTS_LOCKING})
    INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, is_test,
                            next_attempt_at, claimed_by, endpoint)
    SELECT d.id, d.webhook_id, d.account_id, d.event_id, d.event_type, d.is_test,
           -- a test delivery is attempted once, by the API: never due for a worker
           CASE WHEN d.is_test THEN NULL
                WHEN d.park_for > 0 THEN now() + d.park_for * interval '1 second'
                ELSE now() END,
           CASE WHEN d.park_for > 0 OR NOT d.claimed THEN NULL ELSE $13 END,
           d.endpoint
    FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bool[],
                $14::float8[], $15::text[], $16::bool[])
         AS d(id, webhook_id, account_id, event_id, event_type, is_test, park_for, endpoint,
              claimed)
    ON CONFLICT (id) DO NOTHING
    RETURNING id"""


async def insert_events_and_deliveries(
    conn: Conn,
    events: Sequence[Event],
    deliveries: Sequence[NewDelivery],
    *,
    claimed_by: str | None,
) -> set[str]:
    """Insert events and deliveries in one statement; return the ids of deliveries that are new.

    Existing rows are left alone, so a redelivered message creates nothing twice. Being one
    statement, it commits all or nothing without a transaction around it.
    """
    events = _events(events)
    event_columns = (
        [e.account_id for e in events],
        [e.id for e in events],
        [e.mode for e in events],
        [e.type for e in events],
        [e.timestamp for e in events],
        [e.data for e in events],
    )
    if not deliveries:
        if events:
            await conn.execute(_INSERT_EVENTS, *event_columns)
        return set()
    rows = await conn.fetch(
        _INSERT_EVENTS_AND_DELIVERIES,
        *event_columns,
        [d.id for d in deliveries],
        [d.webhook_id for d in deliveries],
        [d.event.account_id for d in deliveries],
        [d.event.id for d in deliveries],
        [d.event.type for d in deliveries],
        [d.is_test for d in deliveries],
        claimed_by,
        [d.park_for for d in deliveries],
        [d.endpoint for d in deliveries],
        [d.claimed for d in deliveries],
    )
    return {r["id"] for r in rows}


def _events(events: Sequence[Event]) -> list[Event]:
    """Each event once (a row may be locked only once per statement), sorted by key: the
    order of code points, which is the purge's `COLLATE "C"` order of the UTF-8 keys."""
    return sorted({(e.account_id, e.id): e for e in events}.values(), key=_key)


def _key(event: Event) -> tuple[str, str]:
    return (event.account_id, event.id)


async def record_attempts(conn: Conn, records: Sequence[AttemptRecord]) -> None:
    """Write attempts and update their deliveries, a batch in one statement.

    An attempt already recorded (the same delivery and number: a write retried after its
    commit went through but the answer was lost) is not added twice. A delivery is updated only
    while it is still pending, so a late duplicate attempt cannot overwrite a final state. A
    retry releases the claim, so any worker may take it when due.
    """
    if not records:
        return
    await conn.execute(
        f"""WITH u AS (
               SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::int[],
                                    $5::int[], $6::text[], $7::text[], $8::text[], $9::text[],
                                    $10::timestamptz[])
                   AS u(id, number, attempted_at, response_status, response_time_ms,
                        error_class, error, response_body, status, next_attempt_at)),
           attempt AS (
               INSERT INTO delivery_attempts (delivery_id, number, attempted_at,
                                              response_status, response_time_ms, error_class,
                                              error, response_body)
               SELECT id, number, attempted_at, response_status, response_time_ms,
                      error_class, error, response_body FROM u
               ON CONFLICT DO NOTHING)
           UPDATE deliveries d SET
               attempts = GREATEST(d.attempts, u.number),
               response_status = u.response_status,
               response_time_ms = u.response_time_ms,
               error = u.error,
               last_attempt_at = u.attempted_at,
               status = u.status,
               next_attempt_at = u.next_attempt_at,
               claimed_by = NULL
           FROM u
           WHERE d.id = u.id AND {STILL_PENDING}""",
        [r.delivery_id for r in records],
        [r.number for r in records],
        [r.attempted_at for r in records],
        [r.response_status for r in records],
        [r.response_time_ms for r in records],
        [r.error_class for r in records],
        [r.error for r in records],
        [r.response_body for r in records],
        [r.status for r in records],
        [r.next_attempt_at for r in records],
    )


async def get_delivery(conn: Conn, delivery_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {RECORD_COLUMNS} FROM deliveries WHERE id = $1", delivery_id
    )
    return row


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """What a delivery list is narrowed to: a status, an event type, both, or neither."""

    status: str | None = None
    event_type: str | None = None


# `total` is exact up to this many deliveries; above, an estimate that is never lower.
EXACT_TOTAL = 10_000
# From this offset on, a page is found by its first row's key (an index-only scan that skips
# `offset` index entries) and then read by keyset: an OFFSET over whole rows would read the
# table's row of every delivery it skips.
ANCHORED_FROM = 1_000
# From this offset on, a webhook whose hours are counted has its page found from the counts
# (engine/store/delivery_counts.py): the skip is then inside one hour.
COUNTED_FROM = 20_000


async def list_deliveries(
    conn: Conn, webhook_id: str, filters: DeliveryFilter, *, offset: int, limit: int
) -> tuple[list[asyncpg.Record], int]:
    """A page of a webhook's deliveries, newest first, and how many match `filters` in all.

    The page is read from deliveries_by_webhook, or, filtered, from deliveries_by_status or
    deliveries_by_event (migration 0012), in index order: no sort, however long the history.
    `total` is exact up to `EXACT_TOTAL`: the newest matching deliveries are counted, up to
    `EXACT_TOTAL` + 1 of them. Above, it is an estimate, at least `EXACT_TOTAL` + 1 and the rows
    up to this page: for a webhook whose hours are counted, the deliveries in them (deep pages:
    plus the newest, uncounted hour or two); otherwise the planner's estimate.
    """
    args: list[Any] = [webhook_id]
    where = ["webhook_id = $1"]
    # Fixed conditions, bound values: each combination has its own plan, and an absent filter
    # is no condition at all (`$2 IS NULL OR status = $2` would keep the indexes from serving).
    for column, value in (("status", filters.status), ("event_type", filters.event_type)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    condition = " AND ".join(where)
    n = len(args)
    # Deliveries in the webhook's counted hours (a deep page's start: all of them), None if not
    # counted: more than EXACT_TOTAL of them make a count of the newest ones pointless.
    start = None
    if offset >= COUNTED_FROM:
        start = await page_start(
            conn, webhook_id, status=filters.status, event_type=filters.event_type, offset=offset
        )
    counted = start.total if start is not None else await _counted(conn, condition, args)
    if offset < ANCHORED_FROM:
        rows: list[asyncpg.Record] = await conn.fetch(
            f"""SELECT {RECORD_COLUMNS} FROM deliveries WHERE {condition}
                ORDER BY created_at DESC, id DESC OFFSET ${n + 1} LIMIT ${n + 2}""",
            *args,
            offset,
            limit,
        )
    elif start is None:
        rows = await _anchored_page(conn, condition, args, before=None, skip=offset, limit=limit)
    elif start.past_end:
        rows = []
    else:
        rows = await _anchored_page(
            conn, condition, args, before=start.before, skip=start.skip, limit=limit
        )
    floor = max(EXACT_TOTAL + 1, offset + len(rows) if rows else 0)
    if counted is not None and counted > EXACT_TOTAL:
        return rows, max(floor, counted)
    newest: int = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT FROM deliveries WHERE {condition} LIMIT ${n + 1}) c",
        *args,
        EXACT_TOTAL + 1,
    )
    if newest <= EXACT_TOTAL:
        return rows, newest
    return rows, max(floor, await _estimate(conn, condition, args))


async def _counted(conn: Conn, condition: str, args: list[Any]) -> int | None:
    """How many matching deliveries the webhook's counted hours hold; None if none counted."""
    counted: int | None = await conn.fetchval(
        f"""SELECT sum(n)::bigint FROM (
                SELECT n FROM delivery_counts WHERE {condition}
                UNION ALL
                SELECT n FROM delivery_count_changes WHERE {condition}) c""",
        *args,
    )
    return counted


async def _anchored_page(
    conn: Conn,
    condition: str,
    args: list[Any],
    *,
    before: datetime | None,
    skip: int,
    limit: int,
) -> list[asyncpg.Record]:
    """Skip `skip` matching deliveries (created before `before`) by an index-only scan, then
    read the page from the key found."""
    n = len(args)
    bound = f"AND created_at < ${n + 2}" if before is not None else ""
    anchor = await conn.fetchrow(
        f"""SELECT created_at, id FROM deliveries WHERE {condition} {bound}
            ORDER BY created_at DESC, id DESC OFFSET ${n + 1} LIMIT 1""",
        *args,
        skip,
        *([before] if before is not None else []),
    )
    if anchor is None:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {RECORD_COLUMNS} FROM deliveries
            WHERE {condition} AND (created_at, id) <= (${n + 1}, ${n + 2})
            ORDER BY created_at DESC, id DESC LIMIT ${n + 3}""",
        *args,
        anchor["created_at"],
        anchor["id"],
        limit,
    )
    return rows


async def _estimate(conn: Conn, condition: str, args: list[Any]) -> int:
    """The planner's estimate of the matching deliveries, from the table's statistics."""
    plan = await conn.fetchval(
        f"EXPLAIN (FORMAT JSON) SELECT FROM deliveries WHERE {condition}", *args
    )
    parsed = orjson.loads(plan) if isinstance(plan, str) else plan
    return int(parsed[0]["Plan"]["Plan Rows"])


def _optional_rfc3339(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


def delivery_json(row: asyncpg.Record) -> dict[str, Any]:
    """The delivery record of docs/contract.md §1."""
    return {
        "id": row["id"],
        "webhookId": row["webhook_id"],
        "eventId": row["event_id"],
        "event": row["event_type"],
        "status": row["status"],
        "attempts": row["attempts"],
        "responseStatus": row["response_status"],
        "responseTimeMs": row["response_time_ms"],
        "error": row["error"],
        "createdAt": rfc3339(row["created_at"]),
        "lastAttemptAt": _optional_rfc3339(row["last_attempt_at"]),
        "nextAttemptAt": _optional_rfc3339(row["next_attempt_at"]),
    }

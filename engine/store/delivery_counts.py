"""Per-hour delivery counts of long delivery lists: how a page deep in one is found fast.

`offset` in a list of millions costs a skip over that many index entries (≈ 0.45 µs each here:
2.3 s for offset 5,000,000). For a webhook with at least `COUNTED_FROM` deliveries, the worker
counts its deliveries per hour (UTC), status and event type once the hour is over
`SETTLE` old (migration 0014: delivery_counts, with the triggers that keep counted hours right
when a delivery changes later). A deep page then adds up whole hours, newest first, to find the
hour it starts in, and skips only inside that hour.

A webhook's hours before its `counted_until` are counted; what is newer (the head, an hour or
two) is counted from the index when a page needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

__all__ = [
    "COUNTED_FROM",
    "SETTLE",
    "Removal",
    "Start",
    "count_hours",
    "fold_changes",
    "page_start",
    "subtract",
]

# An hour is counted once it ended this long ago; the triggers follow changes to rows older
# than an hour, so the five minutes cover a transaction that began before the count.
SETTLE = timedelta(hours=1, minutes=5)
# Webhooks with fewer deliveries are not counted: skipping inside them stays cheap.
COUNTED_FROM = 50_000
# Hours counted in one transaction (while it lasts, late changes to the webhook's counted
# deliveries wait for it): a day.
_CHUNK = timedelta(days=1)


def _hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def count_hours(
    conn: asyncpg.Connection[Any], now: datetime, *, at_least: int = COUNTED_FROM
) -> int:
    """Count the hours that have settled since the last count, for every webhook with at least
    `at_least` deliveries; return how many webhooks were counted."""
    until = _hour(now - SETTLE)
    behind = await conn.fetch(
        """SELECT w.id, s.counted_until FROM webhooks w
           LEFT JOIN delivery_counts_state s ON s.webhook_id = w.id
           WHERE w.deleted_at IS NULL  -- a deleted webhook's list is no longer served
             AND (s.counted_until IS NULL OR s.counted_until < $1)""",
        until,
    )
    counted = 0
    for row in behind:
        start: datetime | None = row["counted_until"]
        if start is None:
            start = await _first_hour(conn, row["id"], until, at_least)
            if start is None:
                continue
            # Committed before counting, so a trigger either sees it or waits for the count.
            await conn.execute(
                """INSERT INTO delivery_counts_state (webhook_id, counted_until) VALUES ($1, $2)
                   ON CONFLICT (webhook_id) DO NOTHING""",
                row["id"],
                start,
            )
        while start < until:
            end = min(until, start + _CHUNK)
            await _count(conn, row["id"], start, end)
            start = end
        counted += 1
    return counted


async def _first_hour(
    conn: asyncpg.Connection[Any], webhook_id: str, until: datetime, at_least: int
) -> datetime | None:
    """The hour of the webhook's oldest delivery, if it has `at_least` of them before `until`;
    None otherwise (not worth counting yet)."""
    enough: int = await conn.fetchval(
        """SELECT count(*) FROM (SELECT FROM deliveries
                                 WHERE webhook_id = $1 AND created_at < $2 LIMIT $3) c""",
        webhook_id,
        until,
        at_least,
    )
    if enough < at_least:
        return None
    oldest: datetime = await conn.fetchval(
        """SELECT created_at FROM deliveries WHERE webhook_id = $1
           ORDER BY created_at, id LIMIT 1""",
        webhook_id,
    )
    return _hour(oldest)


async def _count(
    conn: asyncpg.Connection[Any], webhook_id: str, start: datetime, end: datetime
) -> None:
    async with conn.transaction():
        # First the state row, locked: the count below reads after every change that got in
        # before the lock, and every later change waits for the commit and adds itself.
        await conn.execute(
            "UPDATE delivery_counts_state SET counted_until = $2 WHERE webhook_id = $1",
            webhook_id,
            end,
        )
        await conn.execute(
            """INSERT INTO delivery_counts (webhook_id, hour, status, event_type, n)
               SELECT webhook_id, date_trunc('hour', created_at, 'UTC'), status, event_type,
                      count(*)
               FROM deliveries
               WHERE webhook_id = $1 AND created_at >= $2 AND created_at < $3
               GROUP BY 1, 2, 3, 4
               ON CONFLICT (webhook_id, hour, status, event_type)
               DO UPDATE SET n = delivery_counts.n + excluded.n""",
            webhook_id,
            start,
            end,
        )


async def fold_changes(conn: asyncpg.Connection[Any]) -> int:
    """Move the changes the triggers and the purge recorded into the counts; return how many
    change rows were folded."""
    async with conn.transaction():
        rows = await conn.fetch(
            """WITH moved AS (DELETE FROM delivery_count_changes
                              RETURNING webhook_id, hour, status, event_type, n),
               folded AS (
                   INSERT INTO delivery_counts (webhook_id, hour, status, event_type, n)
                   SELECT webhook_id, hour, status, event_type, sum(n) FROM moved
                   GROUP BY 1, 2, 3, 4
                   ON CONFLICT (webhook_id, hour, status, event_type)
                   DO UPDATE SET n = delivery_counts.n + excluded.n
                   RETURNING webhook_id, hour, status, event_type, n)
               SELECT (SELECT count(*) FROM moved) AS moved, f.* FROM folded f""",
        )
        empty = [r for r in rows if r["n"] == 0]
        if empty:
            await conn.execute(
                """DELETE FROM delivery_counts c
                   USING unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[])
                       AS k(webhook_id, hour, status, event_type)
                   WHERE (c.webhook_id, c.hour, c.status, c.event_type)
                       = (k.webhook_id, k.hour, k.status, k.event_type) AND c.n = 0""",
                [r["webhook_id"] for r in empty],
                [r["hour"] for r in empty],
                [r["status"] for r in empty],
                [r["event_type"] for r in empty],
            )
    return int(rows[0]["moved"]) if rows else 0


@dataclass(frozen=True, slots=True)
class Removal:
    """A delivery the purge removed, as the counts know it."""

    webhook_id: str
    created_at: datetime
    status: str
    event_type: str


async def subtract(conn: asyncpg.Connection[Any], removed: Sequence[Removal]) -> None:
    """Record that these deliveries are gone, for those in counted hours (the purge's own
    transaction: it is the one writer that deletes deliveries)."""
    if not removed:
        return
    await conn.execute(
        """INSERT INTO delivery_count_changes (webhook_id, hour, status, event_type, n)
           SELECT r.webhook_id, date_trunc('hour', r.created_at, 'UTC'), r.status,
                  r.event_type, -count(*)
           FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[])
                AS r(webhook_id, created_at, status, event_type)
           JOIN delivery_counts_state s
             ON s.webhook_id = r.webhook_id AND r.created_at < s.counted_until
           GROUP BY 1, 2, 3, 4""",
        [r.webhook_id for r in removed],
        [r.created_at for r in removed],
        [r.status for r in removed],
        [r.event_type for r in removed],
    )


@dataclass(frozen=True, slots=True)
class Start:
    """Where a deep page starts: skip `skip` matching deliveries created before `before` (None:
    from the newest), and how many match in all. `past_end`: the page is empty."""

    before: datetime | None
    skip: int
    total: int
    past_end: bool = False


async def page_start(
    conn: Any, webhook_id: str, *, status: str | None, event_type: str | None, offset: int
) -> Start | None:
    """Find the hour a page at `offset` starts in from the counts (two round trips); None when
    the webhook's hours are not counted."""
    args: list[Any] = [webhook_id]
    where = ["webhook_id = $1"]
    for column, value in (("status", status), ("event_type", event_type)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    condition = " AND ".join(where)
    n = len(args)
    # Its own query: bound as a value, the newest deliveries' count below is planned as a range
    # of the list's index (as a subquery's result it was planned as a scan of the whole table).
    counted_until: datetime | None = await conn.fetchval(
        "SELECT counted_until FROM delivery_counts_state WHERE webhook_id = $1", webhook_id
    )
    if counted_until is None:
        return None
    row = await conn.fetchrow(
        f"""WITH head AS (
                SELECT count(*) AS n FROM deliveries
                WHERE {condition} AND created_at >= ${n + 2}),
            hours AS (
                SELECT hour, sum(n)::bigint AS n FROM (
                    SELECT hour, n FROM delivery_counts WHERE {condition}
                    UNION ALL
                    SELECT hour, n FROM delivery_count_changes WHERE {condition}) x
                GROUP BY hour),
            running AS (
                SELECT hour, n, sum(n) OVER (ORDER BY hour DESC) AS upto FROM hours),
            found AS (
                SELECT hour, upto - n AS before FROM running
                WHERE upto > ${n + 1} - (SELECT n FROM head)
                ORDER BY hour DESC LIMIT 1)
            SELECT (SELECT n FROM head) AS head,
                   (SELECT coalesce(sum(n), 0) FROM hours)::bigint AS counted,
                   (SELECT hour FROM found) AS hour, (SELECT before FROM found) AS before""",
        *args,
        offset,
        counted_until,
    )
    head = int(row["head"])
    total = head + int(row["counted"])
    if offset < head:
        return Start(before=None, skip=offset, total=total)
    if row["hour"] is None:
        return Start(before=None, skip=0, total=total, past_end=True)
    return Start(
        before=row["hour"] + timedelta(hours=1),
        skip=offset - head - int(row["before"]),
        total=total,
    )

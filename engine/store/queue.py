"""The deliveries table as a work queue: claims, worker heartbeats, releases.

A pending delivery is held by at most one worker at a time (`claimed_by`). A claim counts only
while its worker's row in `workers` has a fresh heartbeat, so a worker killed with `kill -9`
loses its claims after one lease and any other worker takes them over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from engine.core.events import Event
from engine.store.db import Conn
from engine.store.deliveries import STILL_PENDING

__all__ = [
    "ClaimedDelivery",
    "QueueDepth",
    "claim_due",
    "end_deliveries",
    "hand_back_deliveries",
    "heartbeat",
    "own_stale",
    "park_deliveries",
    "queue_depth",
    "release_deliveries",
    "release_lapsed",
    "release_worker",
    "retake_due",
]

# A claim is void when no live worker holds it: none with that id, or one silent for a lease.
_UNCLAIMED = """(d.claimed_by IS NULL OR NOT EXISTS (
                    SELECT 1 FROM workers w
                    WHERE w.id = d.claimed_by
                      AND w.heartbeat_at > now() - make_interval(secs => $2)))"""


# Leases of silence after which a worker that claims nothing is forgotten (its row deleted).
FORGET_AFTER = 10


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A due delivery this worker now holds, with the event it carries."""

    id: str
    webhook_id: str
    attempts: int
    event: Event
    retry_base: int = 0  # attempts made before its current retry schedule began
    endpoint: str | None = None  # the endpoint it was claimed for


@dataclass(frozen=True, slots=True)
class QueueDepth:
    due: int
    waiting: int


async def claim_due(conn: Conn, worker_id: str, wants: Mapping[str, int]) -> list[ClaimedDelivery]:
    """Claim due pending deliveries no worker holds: for each endpoint in `wants`, up to its
    number, oldest due first.

    The caller holds those endpoints' leases (`engine.store.endpoints`), so it is the one worker
    sending to them. Per endpoint, so a backlog at one endpoint never stands in front of another
    endpoint's due deliveries (each is a short scan of `deliveries_unclaimed_by_endpoint`).
    SKIP LOCKED lets several workers claim at once without waiting on each other or taking the
    same row twice. Deliveries held by a worker that stopped beating come back here once
    `release_lapsed` has released them.
    """
    wants = {endpoint: n for endpoint, n in wants.items() if n > 0}
    if not wants:
        return []
    rows = await conn.fetch(
        """UPDATE deliveries d SET claimed_by = $1
            FROM events e
            WHERE d.id IN (
                    SELECT c.id FROM unnest($2::text[], $3::int[]) AS w(endpoint, n),
                    LATERAL (SELECT x.id FROM deliveries x
                             WHERE x.endpoint = w.endpoint AND x.status = 'pending'
                               AND x.claimed_by IS NULL AND x.next_attempt_at <= now()
                             ORDER BY x.next_attempt_at
                             LIMIT w.n
                             FOR UPDATE SKIP LOCKED) c)
              AND e.account_id = d.account_id AND e.id = d.event_id
            RETURNING d.id, d.webhook_id, d.attempts, d.retry_base, d.endpoint, e.id AS event_id,
                      e.type, e.account_id, e.mode, e."timestamp", e.data""",
        worker_id,
        list(wants),
        list(wants.values()),
    )
    return [
        ClaimedDelivery(
            id=r["id"],
            webhook_id=r["webhook_id"],
            attempts=r["attempts"],
            retry_base=r["retry_base"],
            endpoint=r["endpoint"],
            event=Event(
                id=r["event_id"],
                type=r["type"],
                account_id=r["account_id"],
                mode=r["mode"],
                timestamp=r["timestamp"],
                data=bytes(r["data"]),
            ),
        )
        for r in rows
    ]


async def retake_due(
    conn: Conn, worker_id: str, delivery_ids: Sequence[str], *, lease: float
) -> dict[str, int]:
    """Claim those of `delivery_ids` that are pending, due and held by no live worker but this
    one; return their ids and attempts so far.

    For a redelivered message whose deliveries exist already: if this worker's earlier commit
    went through but its hand-off did not, or their worker died, they are taken up again now.
    A delivery waiting for a later retry is not due, so its schedule is kept. A resent one
    (`retry_base` > 0) is left to `claim_due`, which reads where its fresh schedule began.
    """
    rows = await conn.fetch(
        f"""UPDATE deliveries d SET claimed_by = $1
            WHERE d.id = ANY($3::text[]) AND {STILL_PENDING}
              AND d.next_attempt_at <= now() AND d.retry_base = 0
              AND (d.claimed_by = $1 OR {_UNCLAIMED})
            RETURNING d.id, d.attempts""",
        worker_id,
        lease,
        list(delivery_ids),
    )
    return {r["id"]: r["attempts"] for r in rows}


async def release_lapsed(conn: Conn, worker_id: str, *, lease: float) -> int:
    """Release the claims of every worker but this one that is gone or silent for a lease.

    Reads every claimed pending delivery (by `deliveries_claimed`: as many as the workers hold,
    however long the backlog), so it runs every few seconds, not on every poll. A worker
    that was only slow to beat (a database outage) keeps the deliveries it holds in memory;
    if another worker attempts one of them too, receivers deduplicate on the delivery id.

    The row of a worker silent for `FORGET_AFTER` leases that claims nothing any more (its
    claims were released a beat earlier) is deleted: every restart of a pod is a new worker, so
    the table would otherwise only grow. Should that worker come back, its heartbeat adds the
    row again.
    """
    released: int = await conn.fetchval(
        f"""WITH released AS (
                UPDATE deliveries d SET claimed_by = NULL
                WHERE d.status = 'pending' AND d.claimed_by IS NOT NULL
                  AND d.claimed_by <> $1 AND {_UNCLAIMED}
                RETURNING 1),
            forgotten AS (
                DELETE FROM workers w
                WHERE w.id <> $1
                  AND w.heartbeat_at < now() - make_interval(secs => $2 * $3)
                  AND NOT EXISTS (SELECT 1 FROM deliveries d
                                  WHERE d.claimed_by = w.id AND d.status = 'pending'))
            SELECT count(*) FROM released""",
        worker_id,
        lease,
        FORGET_AFTER,
    )
    return released


async def own_stale(conn: Conn, worker_id: str, *, overdue: float) -> list[str]:
    """Pending deliveries this worker claims that have been due for over `overdue` seconds
    (read by `deliveries_claimed`)."""
    rows = await conn.fetch(
        """SELECT id FROM deliveries
           WHERE claimed_by = $1 AND status = 'pending'
             AND next_attempt_at <= now() - make_interval(secs => $2)""",
        worker_id,
        overdue,
    )
    return [r["id"] for r in rows]


async def end_deliveries(conn: Conn, delivery_ids: Sequence[str], *, error: str) -> None:
    """End pending deliveries as `failed` without an attempt (their webhook is gone)."""
    if not delivery_ids:
        return
    await conn.execute(
        f"""UPDATE deliveries d SET status = 'failed', error = $2, next_attempt_at = NULL,
                                   claimed_by = NULL
            WHERE d.id = ANY($1::text[]) AND {STILL_PENDING}""",
        list(delivery_ids),
        error,
    )


async def heartbeat(conn: Conn, worker_id: str, hostname: str) -> None:
    """Create or refresh this worker's row; its claims count while this stays fresh."""
    await conn.execute(
        """INSERT INTO workers (id, hostname) VALUES ($1, $2)
           ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()""",
        worker_id,
        hostname,
    )


async def release_worker(conn: Conn, worker_id: str) -> int:
    """Release every pending delivery and endpoint lease `worker_id` holds and delete its row,
    in one statement.

    Others may then claim the deliveries and take the endpoints at once instead of waiting out
    the lease. The caller has no attempt under way any more.
    """
    released: int = await conn.fetchval(
        """WITH released AS (
               UPDATE deliveries SET claimed_by = NULL
               WHERE claimed_by = $1 AND status = 'pending' RETURNING 1),
           leases AS (
               UPDATE endpoint_leases SET worker_id = NULL, released_at = now()
               WHERE worker_id = $1),
           gone AS (DELETE FROM workers WHERE id = $1)
           SELECT count(*) FROM released""",
        worker_id,
    )
    return released


async def park_deliveries(
    conn: Conn, delivery_ids: Sequence[str], until: Sequence[datetime]
) -> None:
    """Give up this worker's hold on pending deliveries, each due again no sooner than `until`."""
    if not delivery_ids:
        return
    await conn.execute(
        f"""UPDATE deliveries d SET claimed_by = NULL,
                                    next_attempt_at = GREATEST(d.next_attempt_at, u.until)
           FROM unnest($1::text[], $2::timestamptz[]) AS u(id, until)
           WHERE d.id = u.id AND {STILL_PENDING}""",
        list(delivery_ids),
        list(until),
    )


async def hand_back_deliveries(
    conn: Conn, delivery_ids: Sequence[str], endpoints: Sequence[str]
) -> None:
    """Give up this worker's hold on pending deliveries of endpoints it does not send to,
    recording each one's endpoint (its webhook's URL may have moved), so that the holder of
    that endpoint's lease claims them."""
    if not delivery_ids:
        return
    await conn.execute(
        f"""UPDATE deliveries d SET claimed_by = NULL, endpoint = u.endpoint
           FROM unnest($1::text[], $2::text[]) AS u(id, endpoint)
           WHERE d.id = u.id AND {STILL_PENDING}""",
        list(delivery_ids),
        list(endpoints),
    )


async def release_deliveries(conn: Conn, delivery_ids: Sequence[str]) -> None:
    """Give up this worker's hold on some deliveries, so any worker may claim them when due."""
    await conn.execute(
        "UPDATE deliveries SET claimed_by = NULL WHERE id = ANY($1::text[])", list(delivery_ids)
    )


async def queue_depth(conn: Conn) -> QueueDepth:
    """How many pending deliveries are due now, and how many wait for a later retry."""
    row = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
                  count(*) FILTER (WHERE next_attempt_at > now()) AS waiting
           FROM deliveries WHERE status = 'pending'"""
    )
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    return QueueDepth(due=row["due"], waiting=row["waiting"])

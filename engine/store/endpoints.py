"""Endpoint leases: which worker sends to an endpoint (scheme + host + port) right now.

Only the holder of an endpoint's lease sends to it, through its own token bucket and
concurrency cap, so those limits hold for the whole deployment however many workers run. A
lease counts while its worker's heartbeat (`workers`) is fresh, as claims do: a worker killed
with `kill -9` loses its leases after one lease period, and another worker takes them over.
See docs/fleet-limits.md for the design and the alternatives weighed.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.store.db import Conn

__all__ = [
    "QUIET_FOR",
    "acquire_leases",
    "fill_endpoints",
    "leases_held",
    "release_leases",
    "unowned_with_due_work",
]

# An endpoint released at least this long ago has had no request from its last owner for as
# long as a token bucket of burst R takes to refill (R tokens at R a second): its next owner
# may start with a full bucket. Taken over from a worker that went silent, it starts empty.
QUIET_FOR = 1.0


def _live_owner(lease: str) -> str:
    """Lease row `l` is held by a worker that beat within `lease` (a parameter) seconds."""
    return f"""EXISTS (SELECT 1 FROM workers w
                       WHERE w.id = l.worker_id
                         AND w.heartbeat_at > now() - make_interval(secs => {lease}))"""


async def acquire_leases(
    conn: Conn, worker_id: str, endpoints: Sequence[str], *, lease: float
) -> dict[str, bool]:
    """Take the leases of those `endpoints` no live worker but this one holds.

    Returns each endpoint now held, with whether it was quiet (released `QUIET_FOR` ago or
    never leased), so the caller knows whether its bucket may start full. One statement: the
    upsert's row lock makes two workers asking at once take turns, and only one gets it; rows
    are locked in sorted order, so two such statements never wait on each other in a circle.
    """
    endpoints = sorted(set(endpoints))
    if not endpoints:
        return {}
    rows = await conn.fetch(
        f"""WITH before AS (
                SELECT endpoint, released_at FROM endpoint_leases
                WHERE endpoint = ANY($2::text[])),
            taken AS (
                INSERT INTO endpoint_leases AS l (endpoint, worker_id)
                SELECT u.endpoint, $1 FROM unnest($2::text[]) WITH ORDINALITY AS u(endpoint, n)
                ORDER BY u.n
                ON CONFLICT (endpoint) DO UPDATE
                    SET worker_id = $1, acquired_at = now(), released_at = NULL
                    WHERE l.worker_id = $1 OR l.worker_id IS NULL OR NOT {_live_owner("$3")}
                RETURNING l.endpoint)
            SELECT t.endpoint,
                   coalesce(b.released_at < now() - make_interval(secs => $4), b IS NULL)
                       AS quiet
            FROM taken t LEFT JOIN before b ON b.endpoint = t.endpoint""",
        worker_id,
        endpoints,
        lease,
        QUIET_FOR,
    )
    return {r["endpoint"]: r["quiet"] for r in rows}


async def leases_held(conn: Conn, worker_id: str) -> set[str]:
    """The endpoints whose lease this worker holds, as Postgres sees it."""
    rows = await conn.fetch("SELECT endpoint FROM endpoint_leases WHERE worker_id = $1", worker_id)
    return {r["endpoint"] for r in rows}


async def release_leases(conn: Conn, worker_id: str, endpoints: Sequence[str] | None) -> None:
    """Give up this worker's leases on `endpoints` (all of them for None)."""
    await conn.execute(
        """UPDATE endpoint_leases SET worker_id = NULL, released_at = now()
           WHERE worker_id = $1 AND ($2::text[] IS NULL OR endpoint = ANY($2::text[]))""",
        worker_id,
        None if endpoints is None else list(endpoints),
    )


async def unowned_with_due_work(conn: Conn, *, lease: float, limit: int) -> list[str]:
    """Up to `limit` endpoints that have due, unclaimed deliveries and no live lease holder.

    A skip scan of `deliveries_unclaimed_by_endpoint`: one index descent per endpoint with
    unclaimed work (its first entry is its earliest), so a backlog of millions behind one
    endpoint costs what one row does.
    """
    rows = await conn.fetch(
        f"""WITH RECURSIVE e AS (
                (SELECT d.endpoint, d.next_attempt_at FROM deliveries d
                 WHERE d.status = 'pending' AND d.claimed_by IS NULL AND d.endpoint IS NOT NULL
                 ORDER BY d.endpoint, d.next_attempt_at LIMIT 1)
                UNION ALL
                SELECT n.endpoint, n.next_attempt_at FROM e, LATERAL (
                    SELECT d.endpoint, d.next_attempt_at FROM deliveries d
                    WHERE d.status = 'pending' AND d.claimed_by IS NULL
                      AND d.endpoint > e.endpoint
                    ORDER BY d.endpoint, d.next_attempt_at LIMIT 1) n)
            SELECT e.endpoint FROM e
            WHERE e.next_attempt_at <= now()
              AND NOT EXISTS (SELECT 1 FROM endpoint_leases l
                              WHERE l.endpoint = e.endpoint AND {_live_owner("$1")})
            LIMIT $2""",
        lease,
        limit,
    )
    return [r["endpoint"] for r in rows]


async def fill_endpoints(conn: Conn) -> int:
    """Name the endpoint of pending deliveries written without one (from their webhook's URL).

    Normally there are none; a delivery resent from before endpoints were recorded is one.
    """
    filled: str = await conn.execute(
        """UPDATE deliveries d SET endpoint = cargolint_endpoint(w.url)
           FROM webhooks w
           WHERE d.status = 'pending' AND d.endpoint IS NULL AND w.id = d.webhook_id"""
    )
    return int(filled.rsplit(maxsplit=1)[-1])

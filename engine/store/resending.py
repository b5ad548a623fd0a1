"""Resending: a delivery that ended goes back to `pending` with a fresh retry schedule.

The delivery keeps its id, its event (so its body) and its count of attempts; `retry_base`
records how many attempts came before the new schedule, which starts over from its first
step. It is left unclaimed and due, so a worker's poller takes it on its next poll and sends it
through the same path as any retry (per-endpoint limits, claims that survive `kill -9`).

Each statement locks the webhook row (FOR SHARE) while it checks that the webhook is active:
a concurrent deactivation either waits for the resend, then ends what it made pending, or
goes first, and the resend finds the webhook inactive. The lock also holds the URL still while
the delivery is given the endpoint of that URL: the one whose lease holder claims it and
keeps that endpoint's limits (docs/contract.md §7), not the endpoint of the URL it had when
it was made.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine.store.deliveries import RECORD_COLUMNS, Conn

__all__ = ["Refusal", "Resent", "recover", "resend"]

# The endpoint is computed here, once per statement, not once per delivery it makes pending.
_ACTIVE_WEBHOOK = """SELECT id, cargolint_endpoint(url) AS endpoint FROM webhooks
                     WHERE id = $2 AND account_id = $3 AND mode = $4 AND deleted_at IS NULL
                       AND active
                     FOR SHARE"""


def _fresh(endpoint: str) -> str:
    """What a resend sets: pending, claimed by nobody, a schedule that starts over, and the
    endpoint of the webhook's URL now (`endpoint`: its column, from the locked webhook row)."""
    return f"""status = 'pending', retry_base = d.attempts, claimed_by = NULL,
                endpoint = {endpoint}"""


class Refusal(enum.Enum):
    """Why a delivery was not resent, in the order the checks are made."""

    WEBHOOK_NOT_FOUND = "webhook_not_found"
    DELIVERY_NOT_FOUND = "delivery_not_found"
    WEBHOOK_INACTIVE = "webhook_inactive"
    NOT_RESENDABLE = "not_resendable"
    DELIVERY_PENDING = "delivery_pending"


@dataclass(frozen=True, slots=True)
class Resent:
    record: asyncpg.Record


async def resend(
    conn: Conn, *, account_id: str, mode: str, webhook_id: str, delivery_id: str
) -> Resent | Refusal:
    """Resend one ended delivery of the key's own webhook, or say why not."""
    row = await conn.fetchrow(
        f"""WITH w AS ({_ACTIVE_WEBHOOK})
            UPDATE deliveries d SET {_fresh("w.endpoint")}, next_attempt_at = now()
            FROM w
            WHERE d.id = $1 AND d.webhook_id = w.id
              AND d.status IN ('succeeded', 'failed') AND NOT d.is_test
            RETURNING {", ".join(f"d.{c.strip()}" for c in RECORD_COLUMNS.split(","))}""",
        delivery_id,
        webhook_id,
        account_id,
        mode,
    )
    if row is not None:
        return Resent(row)
    why = await conn.fetchrow(
        """SELECT w.active, d.status, d.is_test
           FROM webhooks w LEFT JOIN deliveries d ON d.id = $1 AND d.webhook_id = w.id
           WHERE w.id = $2 AND w.account_id = $3 AND w.mode = $4 AND w.deleted_at IS NULL""",
        delivery_id,
        webhook_id,
        account_id,
        mode,
    )
    if why is None:
        return Refusal.WEBHOOK_NOT_FOUND
    if why["status"] is None:
        return Refusal.DELIVERY_NOT_FOUND
    if not why["active"]:
        return Refusal.WEBHOOK_INACTIVE
    if why["is_test"]:
        return Refusal.NOT_RESENDABLE
    # Pending, whether it was all along or another resend made it so a moment ago.
    return Refusal.DELIVERY_PENDING


async def recover(
    conn: Conn,
    *,
    account_id: str,
    mode: str,
    webhook_id: str,
    since: datetime,
    until: datetime | None,
    rate: float,
) -> int | Refusal:
    """Resend every failed, non-test delivery of the webhook created in [since, until) (until
    None: now) in one statement; return how many, or why none could be.

    They come due as a token bucket of `rate` a second and burst `rate` would let them go,
    oldest first: the first `rate` at once, then `rate` a second. Sooner would only wait in the
    worker's limiter for the endpoint, and a recover of 100,000 does not put 100,000 rows due
    at one instant ahead of every other webhook's retries.
    """
    row = await conn.fetchrow(
        f"""WITH w AS ({_ACTIVE_WEBHOOK}),
            picked AS (
                SELECT d.id, w.endpoint, row_number() OVER (ORDER BY d.created_at, d.id) - 1 AS n
                FROM deliveries d JOIN w ON d.webhook_id = w.id
                WHERE d.status = 'failed' AND NOT d.is_test
                  AND d.created_at >= $1 AND d.created_at < coalesce($5, now())),
            resent AS (
                UPDATE deliveries d SET {_fresh("picked.endpoint")},
                    next_attempt_at = now() + make_interval(
                        secs => greatest(picked.n + 1 - $6::float8, 0) / $6::float8)
                FROM picked
                WHERE d.id = picked.id AND d.status = 'failed'
                RETURNING 1)
            SELECT (SELECT count(*) FROM w) AS active, (SELECT count(*) FROM resent) AS resent""",
        since,
        webhook_id,
        account_id,
        mode,
        until,
        rate,
    )
    assert row is not None  # noqa: S101 - a SELECT of two aggregates returns one row
    if row["active"]:
        return int(row["resent"])
    found = await conn.fetchval(
        """SELECT 1 FROM webhooks
           WHERE id = $1 AND account_id = $2 AND mode = $3 AND deleted_at IS NULL""",
        webhook_id,
        account_id,
        mode,
    )
    return Refusal.WEBHOOK_INACTIVE if found else Refusal.WEBHOOK_NOT_FOUND

"""Webhooks the engine disables: failing streaks, 410 Gone, and the disabling itself.

`webhooks.failing_since` is the first failed attempt after the webhook's last success (null
while its last attempt succeeded). It is written only when it changes — the first failure
after a success, the first success after failures — so a healthy webhook's attempts cost one
read of its row per batch of attempts and no write. A webhook whose attempts have all failed
for `CARGOLINT_DISABLE_AFTER` is disabled at its next failed attempt (reason `failing`); one
whose receiver answered 410 Gone at once (reason `gone`). Disabling ends the webhook's pending
deliveries `failed` with `webhook disabled` and notifies every worker's cache, in one statement.
Test deliveries never come here: the API records them itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from engine.store.db import NOTIFY_CHANNEL, Conn

__all__ = [
    "DISABLED",
    "Seen",
    "Streak",
    "disable_webhooks",
    "note_streaks",
    "streaks",
]

# The error of a pending delivery ended because the engine disabled its webhook.
DISABLED = "webhook disabled"


@dataclass(frozen=True, slots=True)
class Seen:
    """One attempt's verdict on its webhook: it succeeded or failed, starting `at`."""

    webhook_id: str
    at: datetime
    succeeded: bool


@dataclass(frozen=True, slots=True)
class Streak:
    """What a batch of attempts says about one webhook.

    `ok_at`: its latest success. `first_failed_at` / `last_failed_at`: its first and last
    failures after that success (after nothing, without one), None if none failed after it.
    """

    webhook_id: str
    ok_at: datetime | None
    first_failed_at: datetime | None
    last_failed_at: datetime | None


def streaks(seen: Iterable[Seen]) -> list[Streak]:
    """Each webhook's streak in a batch of verdicts, in any order (attempts end out of order),
    by webhook id: workers that write overlapping batches lock their rows in the same order."""
    by_webhook: dict[str, list[Seen]] = {}
    for s in seen:
        by_webhook.setdefault(s.webhook_id, []).append(s)
    result: list[Streak] = []
    for webhook_id, verdicts in sorted(by_webhook.items()):
        ok_at = max((s.at for s in verdicts if s.succeeded), default=None)
        failed = [s.at for s in verdicts if not s.succeeded and (ok_at is None or s.at > ok_at)]
        result.append(
            Streak(webhook_id, ok_at, min(failed, default=None), max(failed, default=None))
        )
    return result


# One statement per batch. A webhook's new failing_since: none after a success that ends the
# batch (unless another worker has seen a later failure meanwhile); after failures, the earliest
# failure since the latest success known. Only rows whose value changes are written. Returns
# the webhooks failing for `$5` seconds by a failure of this batch, and since when.
_NOTE_STREAKS = """
WITH t AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[])
        AS t(id, ok_at, first_failed_at, last_failed_at)),
w AS (
    SELECT w.id, w.failing_since AS old, t.last_failed_at,
           CASE WHEN t.first_failed_at IS NULL
                    THEN CASE WHEN w.failing_since > t.ok_at THEN w.failing_since END
                WHEN w.failing_since IS NULL OR w.failing_since < t.ok_at
                    THEN t.first_failed_at
                ELSE LEAST(w.failing_since, t.first_failed_at) END AS new
    FROM webhooks w JOIN t ON w.id = t.id
    WHERE w.active AND w.deleted_at IS NULL),
changed AS (
    UPDATE webhooks SET failing_since = w.new
    FROM w
    WHERE webhooks.id = w.id AND w.new IS DISTINCT FROM w.old
      -- another worker's change since the read wins (read committed re-reads the row)
      AND webhooks.failing_since IS NOT DISTINCT FROM w.old)
SELECT id, new FROM w WHERE w.new <= w.last_failed_at - make_interval(secs => $5)"""


async def note_streaks(
    conn: Conn, batch: Sequence[Streak], *, disable_after: float
) -> list[tuple[str, datetime]]:
    """Write the batch's failing-streak transitions; return the webhooks to disable as
    `failing` (their attempts have all failed for `disable_after` seconds, by a failure of this
    batch) with the failing_since that qualifies them."""
    if not batch:
        return []
    rows = await conn.fetch(
        _NOTE_STREAKS,
        [s.webhook_id for s in batch],
        [s.ok_at for s in batch],
        [s.first_failed_at for s in batch],
        [s.last_failed_at for s in batch],
        disable_after,
    )
    return [(r["id"], r["new"]) for r in rows]


# One statement, so it commits as a whole and the NOTIFYs go out only once it has: deactivate,
# end the pending deliveries, tell every worker. A webhook already inactive, deleted or (for
# `failing`) no longer failing since the given instant is left alone.
_DISABLE = f"""
WITH u AS (
    SELECT * FROM unnest($1::text[], $3::timestamptz[]) AS u(id, failing_since)),
off AS (
    UPDATE webhooks w SET active = false, disabled_reason = $2, disabled_at = now(),
                          updated_at = now()
    FROM u
    WHERE w.id = u.id AND w.active AND w.deleted_at IS NULL
      AND (u.failing_since IS NULL OR w.failing_since <= u.failing_since)
    RETURNING w.id),
ended AS (
    UPDATE deliveries d SET status = 'failed', error = $4, next_attempt_at = NULL,
                            claimed_by = NULL
    FROM off
    WHERE d.webhook_id = off.id AND d.status = 'pending')
SELECT id, pg_notify('{NOTIFY_CHANNEL}', id) FROM off"""


async def disable_webhooks(
    conn: Conn,
    webhook_ids: Sequence[str],
    reason: str,
    *,
    failing_since: Sequence[datetime | None] | None = None,
) -> list[str]:
    """Disable these webhooks for `reason` (`failing` or `gone`); return those it disabled.

    With `failing_since` (one per webhook), a webhook is disabled only if it has still been
    failing since then at the latest: a success another worker recorded meanwhile saves it.
    """
    if not webhook_ids:
        return []
    since = list(failing_since) if failing_since is not None else [None] * len(webhook_ids)
    rows = await conn.fetch(_DISABLE, list(webhook_ids), reason, since, DISABLED)
    return [r["id"] for r in rows]

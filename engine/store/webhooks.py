"""Webhooks: the API's CRUD, scoped by (account, mode), and the worker's loaders.

Every change runs in one transaction that also sends `NOTIFY cargolint_webhooks, '<id>'`, so
workers refresh their cache only once the change is committed. Deleting is soft (`deleted_at`):
delivery history stays, and a deleted webhook is 404 everywhere after. Deleting or deactivating
a webhook ends its pending deliveries as `failed`; re-activating one the engine disabled clears
why it was disabled. Rotating the secret keeps the previous one signing for an overlap.

For the worker: `load_active` (every active webhook) and `load_one` (one webhook after a NOTIFY)
return `WebhookTarget`s with the signing secret already opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from engine.core.crypto import SecretBox, new_webhook_secret
from engine.core.ids import new_id
from engine.core.times import rfc3339
from engine.store.db import NOTIFY_CHANNEL, Conn, TxConn

# Conn is in __all__ for the API, which names it as this module's.
__all__ = [
    "UPDATABLE",
    "Conn",
    "WebhookLimitError",
    "WebhookTarget",
    "create_webhook",
    "delete_webhook",
    "get_webhook",
    "list_webhooks",
    "load_active",
    "load_one",
    "rotate_secret",
    "update_webhook",
    "webhook_json",
]


UPDATABLE = ("url", "events", "active", "description")
# The previous secret's expiry is shown only while it still signs (by the database's clock).
_COLUMNS = """id, url, events, active, description, created_at, updated_at, disabled_reason,
    disabled_at, CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at
                 END AS previous_secret_expires_at"""
_TARGET_COLUMNS = (
    "id, account_id, mode, url, events, secret, active, previous_secret, previous_secret_expires_at"
)


class WebhookLimitError(Exception):
    """The account already has as many webhooks (in this mode) as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an account may have at most {limit} webhooks in each mode")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """What the worker needs to deliver to a webhook.

    The signing secret stays sealed until `secret` is first read: decrypting every secret when
    the cache loads would cost about 30 µs each (3 s per 100,000 webhooks), and a secret this
    worker cannot open fails that webhook's attempts, where it shows, not its whole load.
    """

    id: str
    account_id: str
    mode: str
    url: str
    events: tuple[str, ...]
    sealed: str = field(repr=False)
    active: bool
    box: SecretBox = field(repr=False, compare=False)
    # The secret a rotation replaced, and when it stops signing (None: no overlap).
    previous_sealed: str | None = field(default=None, repr=False)
    previous_expires_at: datetime | None = None

    @property
    def secret(self) -> str:
        """The plain signing secret (opened once, then memoised by the box).

        Raises ValueError when the box lacks the key it was sealed with.
        """
        return self.box.open(self.sealed)

    def signing_secrets(self, now: datetime) -> tuple[str, str | None]:
        """The secrets for `X-CargoLint-Signature` and `X-CargoLint-Signature-Next` at `now`.

        During a rotation's overlap the previous secret keeps signing the usual header and the
        new one signs `-Next`; once the overlap ends the new secret signs the usual header alone.
        Each attempt asks with its own clock, so the overlap ends on time on every worker.
        Raises ValueError when the box lacks a key a secret was sealed with.
        """
        if (
            self.previous_sealed is not None
            and self.previous_expires_at is not None
            and now < self.previous_expires_at
        ):
            return self.box.open(self.previous_sealed), self.secret
        return self.secret, None


def _optional_rfc3339(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


def webhook_json(row: asyncpg.Record, *, secret: str | None = None) -> dict[str, Any]:
    """The webhook object of docs/contract.md §1 and §6; `secret` only when one was just made
    (create and rotate-secret)."""
    body: dict[str, Any] = {
        "id": row["id"],
        "url": row["url"],
        "events": list(row["events"]),
        "active": row["active"],
        "description": row["description"],
        "createdAt": rfc3339(row["created_at"]),
        "updatedAt": rfc3339(row["updated_at"]),
        "previousSecretExpiresAt": _optional_rfc3339(row["previous_secret_expires_at"]),
        "disabledReason": row["disabled_reason"],
        "disabledAt": _optional_rfc3339(row["disabled_at"]),
    }
    if secret is not None:
        body["secret"] = secret
    return body


async def _notify(conn: TxConn, webhook_id: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, webhook_id)


async def _end_pending(conn: TxConn, webhook_id: str, reason: str) -> None:
    await conn.execute(
        """UPDATE deliveries SET status = 'failed', error = $2, next_attempt_at = NULL,
                                 claimed_by = NULL
           WHERE webhook_id = $1 AND status = 'pending'""",
        webhook_id,
        reason,
    )


async def create_webhook(
    conn: TxConn,
    *,
    account_id: str,
    mode: str,
    url: str,
    events: Sequence[str],
    active: bool,
    description: str | None,
    box: SecretBox,
    limit: int,
) -> tuple[asyncpg.Record, str]:
    """Create a webhook; return its row and its plain signing secret (shown once).

    Raises WebhookLimitError when the account has `limit` webhooks in this mode already.
    """
    secret = new_webhook_secret(mode)
    webhook_id = new_id("wh")
    async with conn.transaction():
        # Lock the account so two concurrent creates cannot both slip under the cap.
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        count = await conn.fetchval(
            """SELECT count(*) FROM webhooks
               WHERE account_id = $1 AND mode = $2 AND deleted_at IS NULL""",
            account_id,
            mode,
        )
        if count >= limit:
            raise WebhookLimitError(limit)
        row = await conn.fetchrow(
            f"""INSERT INTO webhooks (id, account_id, mode, url, events, active, description,
                                      secret)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                RETURNING {_COLUMNS}""",
            webhook_id,
            account_id,
            mode,
            url,
            list(events),
            active,
            description,
            box.seal(secret),
        )
        await _notify(conn, webhook_id)
    assert row is not None  # noqa: S101 - INSERT ... RETURNING always returns the row
    return row, secret


async def get_webhook(
    conn: Conn, *, account_id: str, mode: str, webhook_id: str
) -> asyncpg.Record | None:
    """The webhook if it exists, is not deleted, and belongs to this account and mode."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM webhooks
            WHERE id = $1 AND account_id = $2 AND mode = $3 AND deleted_at IS NULL""",
        webhook_id,
        account_id,
        mode,
    )
    return row


async def list_webhooks(
    conn: TxConn, *, account_id: str, mode: str, offset: int, limit: int
) -> tuple[list[asyncpg.Record], int]:
    """A page of the account's webhooks in this mode, newest first, and their total."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM webhooks
            WHERE account_id = $1 AND mode = $2 AND deleted_at IS NULL
            ORDER BY created_at DESC, id DESC OFFSET $3 LIMIT $4""",
        account_id,
        mode,
        offset,
        limit,
    )
    total: int = await conn.fetchval(
        """SELECT count(*) FROM webhooks
           WHERE account_id = $1 AND mode = $2 AND deleted_at IS NULL""",
        account_id,
        mode,
    )
    return rows, total


async def update_webhook(
    conn: TxConn, *, account_id: str, mode: str, webhook_id: str, changes: Mapping[str, Any]
) -> asyncpg.Record | None:
    """Apply `changes` (a subset of UPDATABLE) and return the updated row, or None if not found.

    Deactivating ends the webhook's pending deliveries. Activating an inactive webhook clears
    why the engine disabled it and its run of failures, so it gets a whole new grace period;
    `active: true` on an active webhook leaves a run of failures counting. With no changes,
    nothing is written.
    """
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update {sorted(unknown)}")
    if not changes:
        return await get_webhook(conn, account_id=account_id, mode=mode, webhook_id=webhook_id)
    args: list[Any] = [webhook_id, account_id, mode]
    sets = ["updated_at = now()"]
    for column in UPDATABLE:  # fixed names only; values are bound parameters
        if column in changes:
            value = changes[column]
            args.append(list(value) if column == "events" else value)
            sets.append(f"{column} = ${len(args)}")
    if changes.get("active") is True:
        # `active` on the right-hand side is the row's value before this update.
        sets.extend(
            f"{column} = CASE WHEN active THEN {column} END"
            for column in ("disabled_reason", "disabled_at", "failing_since")
        )
    async with conn.transaction():
        row: asyncpg.Record | None = await conn.fetchrow(
            f"""UPDATE webhooks SET {", ".join(sets)}
                WHERE id = $1 AND account_id = $2 AND mode = $3 AND deleted_at IS NULL
                RETURNING {_COLUMNS}""",
            *args,
        )
        if row is None:
            return None
        if changes.get("active") is False:
            await _end_pending(conn, webhook_id, "webhook deactivated")
        await _notify(conn, webhook_id)
    return row


async def delete_webhook(conn: TxConn, *, account_id: str, mode: str, webhook_id: str) -> bool:
    """Soft-delete the webhook and end its pending deliveries; False if not found."""
    async with conn.transaction():
        deleted = await conn.fetchval(
            """UPDATE webhooks SET deleted_at = now(), updated_at = now()
               WHERE id = $1 AND account_id = $2 AND mode = $3 AND deleted_at IS NULL
               RETURNING id""",
            webhook_id,
            account_id,
            mode,
        )
        if deleted is None:
            return False
        await _end_pending(conn, webhook_id, "webhook deleted")
        await _notify(conn, webhook_id)
    return True


async def rotate_secret(
    conn: TxConn,
    *,
    account_id: str,
    mode: str,
    webhook_id: str,
    overlap_seconds: int,
    box: SecretBox,
) -> tuple[asyncpg.Record, str] | None:
    """Give the webhook a new signing secret; return its row and the new plain secret (shown
    once), or None if not found.

    With an overlap, the secret being replaced keeps signing `X-CargoLint-Signature` for
    `overlap_seconds` (sealed as it was stored); a previous secret still in its overlap is
    dropped. With 0, the new secret signs alone at once.
    """
    secret = new_webhook_secret(mode)
    async with conn.transaction():
        row: asyncpg.Record | None = await conn.fetchrow(
            f"""UPDATE webhooks SET
                    previous_secret = CASE WHEN $4 > 0 THEN secret END,
                    previous_secret_expires_at =
                        CASE WHEN $4 > 0 THEN now() + make_interval(secs => $4) END,
                    secret = $5,
                    updated_at = now()
                WHERE id = $1 AND account_id = $2 AND mode = $3 AND deleted_at IS NULL
                RETURNING {_COLUMNS}""",
            webhook_id,
            account_id,
            mode,
            overlap_seconds,
            box.seal(secret),
        )
        if row is None:
            return None
        await _notify(conn, webhook_id)
    return row, secret


def _target(row: asyncpg.Record, box: SecretBox) -> WebhookTarget:
    return WebhookTarget(
        id=row["id"],
        account_id=row["account_id"],
        mode=row["mode"],
        url=row["url"],
        events=tuple(row["events"]),
        sealed=row["secret"],
        active=row["active"],
        box=box,
        previous_sealed=row["previous_secret"],
        previous_expires_at=row["previous_secret_expires_at"],
    )


async def load_active(conn: Conn, box: SecretBox) -> list[WebhookTarget]:
    """Every active, undeleted webhook; secrets stay sealed until used (`WebhookTarget`)."""
    rows = await conn.fetch(
        f"SELECT {_TARGET_COLUMNS} FROM webhooks WHERE active AND deleted_at IS NULL"
    )
    return [_target(row, box) for row in rows]


async def load_one(conn: Conn, webhook_id: str, box: SecretBox) -> WebhookTarget | None:
    """One webhook, active or not (see `active`), or None if it does not exist or is deleted."""
    row = await conn.fetchrow(
        f"SELECT {_TARGET_COLUMNS} FROM webhooks WHERE id = $1 AND deleted_at IS NULL",
        webhook_id,
    )
    return None if row is None else _target(row, box)

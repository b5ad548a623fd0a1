"""One delivery in full, as the API shows it: its record, the body it carries, its attempts."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from engine.core.payload import build_body
from engine.store.db import Conn
from engine.store.deliveries import RECORD_COLUMNS

__all__ = ["DeliveryDetail", "get_delivery_detail"]


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    """A delivery's record, the exact body sent for it (None if its event is gone), and every
    attempt oldest first."""

    record: asyncpg.Record
    body: bytes | None
    attempts: list[asyncpg.Record]


async def get_delivery_detail(
    conn: Conn, webhook_id: str, delivery_id: str
) -> DeliveryDetail | None:
    """The delivery if it is one of this webhook's (the caller has checked the webhook is the
    key's own), else None."""
    prefixed = ", ".join(f"d.{column.strip()}" for column in RECORD_COLUMNS.split(","))
    row = await conn.fetchrow(
        f"""SELECT {prefixed}, d.is_test, e."timestamp", e.data
            FROM deliveries d
            LEFT JOIN events e ON e.account_id = d.account_id AND e.id = d.event_id
            WHERE d.id = $1 AND d.webhook_id = $2""",
        delivery_id,
        webhook_id,
    )
    if row is None:
        return None
    body = None
    if row["data"] is not None:
        # The same function and inputs as the worker's attempts: the very bytes it sends.
        body = build_body(
            event_type=row["event_type"],
            timestamp=row["timestamp"],
            webhook_id=row["webhook_id"],
            delivery_id=row["id"],
            data=row["data"],
            test=row["is_test"],
        )
    attempts = await conn.fetch(
        """SELECT number, attempted_at, response_status, response_time_ms, error, response_body
           FROM delivery_attempts WHERE delivery_id = $1 ORDER BY number""",
        delivery_id,
    )
    return DeliveryDetail(row, body, attempts)

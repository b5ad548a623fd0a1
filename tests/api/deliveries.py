"""Deliveries in a chosen state for API tests, made through the store as the worker makes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import orjson

from engine.core.events import Event
from engine.core.ids import delivery_id, new_id
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from tests.worker.helpers import event_data


async def add_delivery(
    pool: asyncpg.Pool[Any],
    webhook_id: str,
    account_id: str,
    *,
    mode: str = "test",
    event_type: str = "document.uploaded",
    status: str = "pending",
    attempts: int = 0,
    created_at: datetime | None = None,
    is_test: bool = False,
    data: dict[str, Any] | None = None,
) -> str:
    """One delivery of a new event to the webhook, left in `status` after `attempts` attempts.

    A pending one is left unclaimed and due in an hour, so no worker takes it meanwhile.
    """
    event = Event(
        id=new_id("evt_test" if is_test else "evt"),
        type=event_type,
        account_id=account_id,
        mode=mode,
        timestamp="2026-03-02T11:45:00Z",
        data=orjson.dumps(data if data is not None else event_data(event_type)),
    )
    dlv = delivery_id(webhook_id, account_id, event.id)
    await insert_events_and_deliveries(
        pool, [event], [NewDelivery(dlv, webhook_id, event, is_test=is_test)], claimed_by=None
    )
    await pool.execute(
        """UPDATE deliveries SET status = $2, attempts = $3,
                  created_at = coalesce($4, created_at),
                  next_attempt_at = CASE WHEN $2 = 'pending' THEN now() + interval '1 hour' END,
                  last_attempt_at = CASE WHEN $3 > 0 THEN now() END,
                  error = CASE WHEN $2 = 'failed' THEN 'HTTP 500' END,
                  response_status = CASE WHEN $3 > 0 THEN
                      CASE WHEN $2 = 'succeeded' THEN 200 ELSE 500 END END
           WHERE id = $1""",
        dlv,
        status,
        attempts,
        created_at,
    )
    return dlv

"""End to end: publish an event, and each matching webhook receives it, signed, once."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from engine import __version__
from engine.settings import Settings
from engine.worker.main import Worker
from tests.receiver import Receiver
from tests.worker.helpers import (
    ALL_TYPES,
    Publisher,
    dlv,
    make_event,
    subscribed,
    verify_signature,
    wait_final,
)


async def test_each_event_type_is_delivered_signed(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account, webhook_id, secret = await subscribed(worker, pool, wsettings, receiver.url + "/hook")
    events = [make_event(account, t) for t in ALL_TYPES]
    for event in events:
        await publisher.publish(event)

    got = await receiver.wait_for(3)
    by_event = {orjson.loads(r.body)["event"]: r for r in got}
    assert set(by_event) == set(ALL_TYPES)
    for event in events:
        request = by_event[event["event"]]
        body = orjson.loads(request.body)
        expected_id = dlv(webhook_id, account, event)
        assert body == {
            "event": event["event"],
            "timestamp": event["timestamp"],
            "webhookId": webhook_id,
            "deliveryId": expected_id,
            "data": event["data"],
        }
        assert request.path == "/hook"
        assert request.body == orjson.dumps(body)  # compact JSON
        h = request.headers
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"] == f"CargoLint-Webhooks/{__version__}"
        assert h["X-CargoLint-Event"] == event["event"]
        assert h["X-CargoLint-Delivery"] == expected_id
        assert h["X-CargoLint-Signature"].startswith("sha256=")
        assert verify_signature(secret, request.body, h["X-CargoLint-Signature"])
        assert not verify_signature("whsec_wrong", request.body, h["X-CargoLint-Signature"])

    rows = await wait_final(pool, [dlv(webhook_id, account, e) for e in events])
    for row in rows.values():
        assert row["status"] == "succeeded"
        assert row["attempts"] == 1
        assert row["response_status"] == 200
        assert row["claimed_by"] is None
        assert row["next_attempt_at"] is None
    attempts = await pool.fetch(
        "SELECT * FROM delivery_attempts WHERE delivery_id = ANY($1::text[])", list(rows)
    )
    assert len(attempts) == 3
    assert all(a["number"] == 1 and a["response_body"] == "ok" for a in attempts)

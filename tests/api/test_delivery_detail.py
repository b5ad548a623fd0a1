"""GET /webhooks/{id}/deliveries/{deliveryId}: the record, the body sent, every attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson

from engine.store.accounts import create_key
from engine.store.deliveries import AttemptRecord, record_attempts
from tests.api.conftest import Account, Client, MakeAccount
from tests.api.deliveries import add_delivery
from tests.api.test_test_delivery import DELIVERY_KEYS
from tests.api.test_webhooks import HOOK, TIMESTAMP, assert_error
from tests.receiver import Receiver

ATTEMPT_KEYS = {
    "number", "attemptedAt", "responseStatus", "responseTimeMs", "error", "responseBody"
}  # fmt: skip


async def test_a_test_delivery_shows_the_very_body_the_receiver_got(
    client: Client, receiver: Receiver
) -> None:
    created = await client.create(f"{receiver.url}/hook", ["compliance.warning"])
    _, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    path = f"/api/v1/webhooks/{created['id']}/deliveries/{record['id']}"
    assert client.key is not None
    async with client.http.get(client.base + path, headers={"X-API-Key": client.key}) as answer:
        assert answer.status == 200
        raw = await answer.read()
    detail = orjson.loads(raw)
    assert set(detail) == DELIVERY_KEYS | {"payload", "attemptLog"}
    assert {k: detail[k] for k in DELIVERY_KEYS} == record
    sent = receiver.requests[0].body
    assert detail["payload"]["test"] is True
    assert detail["payload"]["deliveryId"] == record["id"]
    # The payload is the body as sent, byte for byte, inside the response.
    assert sent in raw
    assert orjson.dumps(detail["payload"]) == sent
    (attempt,) = detail["attemptLog"]
    assert set(attempt) == ATTEMPT_KEYS
    assert attempt["number"] == 1
    assert TIMESTAMP.match(attempt["attemptedAt"])
    assert attempt["attemptedAt"] == record["lastAttemptAt"]
    assert (attempt["responseStatus"], attempt["error"], attempt["responseBody"]) == (
        200,
        None,
        "ok",
    )
    assert isinstance(attempt["responseTimeMs"], int)


async def test_every_attempt_is_listed_oldest_first(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    data = {"document": {"id": "doc_1", "fileName": "ü.pdf", "documentType": "x", "status": "y"}}
    dlv = await add_delivery(pool, created["id"], account.id, data=data)
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    long_body = "é" * 3000  # 6,000 bytes of UTF-8
    records = [
        AttemptRecord(dlv, 3, start + timedelta(seconds=30), 200, 12, None, None, "fine",
                      "succeeded", None),
        AttemptRecord(dlv, 1, start, None, 5003, "timeout", "timed out after 5s", None,
                      "pending", start + timedelta(seconds=5)),
        AttemptRecord(dlv, 2, start + timedelta(seconds=5), 500, 40, "http", "HTTP 500",
                      long_body, "pending", start + timedelta(seconds=30)),
    ]  # fmt: skip
    for record in sorted(records, key=lambda r: r.number):
        await record_attempts(pool, [record])

    status, detail, _ = await client.call(
        "GET", f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}"
    )
    assert status == 200
    assert (detail["status"], detail["attempts"], detail["responseStatus"]) == ("succeeded", 3, 200)
    log = detail["attemptLog"]
    assert [a["number"] for a in log] == [1, 2, 3]
    assert [a["attemptedAt"] for a in log] == [
        "2026-12-01T10:00:00.000Z",
        "2026-12-01T10:00:05.000Z",
        "2026-12-01T10:00:30.000Z",
    ]
    assert [(a["responseStatus"], a["responseTimeMs"], a["error"]) for a in log] == [
        (None, 5003, "timed out after 5s"),
        (500, 40, "HTTP 500"),
        (200, 12, None),
    ]
    assert log[0]["responseBody"] is None
    assert log[1]["responseBody"] == "é" * 2048  # the first 4 KiB, whole characters
    assert log[2]["responseBody"] == "fine"
    assert detail["payload"] == {
        "event": "document.uploaded",
        "timestamp": "2026-03-02T11:45:00Z",
        "webhookId": created["id"],
        "deliveryId": dlv,
        "data": data,
    }


async def test_a_pending_delivery_never_attempted_has_an_empty_log(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id, event_type="compliance.warning")
    status, detail, _ = await client.call(
        "GET", f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}"
    )
    assert status == 200
    assert (detail["status"], detail["attemptLog"]) == ("pending", [])
    assert detail["payload"]["event"] == "compliance.warning"
    assert "test" not in detail["payload"]


async def test_another_webhooks_accounts_or_modes_delivery_is_404(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    owner = await make_account()
    mine = Client(http, api, owner.key)
    first, second = await mine.create(HOOK), await mine.create(HOOK)
    dlv = await add_delivery(pool, first["id"], owner.id)
    ok, _, _ = await mine.call("GET", f"/api/v1/webhooks/{first['id']}/deliveries/{dlv}")
    assert ok == 200

    stranger = Client(http, api, (await make_account()).key)
    issued = await create_key(pool, account_id=owner.id, mode="live")
    assert issued is not None
    live = Client(http, api, issued.api_key)
    for client, webhook_id, delivery in [
        (mine, second["id"], dlv),  # the same account's other webhook
        (stranger, first["id"], dlv),  # another account
        (live, first["id"], dlv),  # the same account's other mode
        (mine, first["id"], "dlv_" + "0" * 24),  # no such delivery
        (mine, first["id"], "dlv_UPPER"),  # malformed
        (mine, first["id"], "evt_123"),
        (mine, first["id"], "dlv_" + "a" * 65),
    ]:
        status, body, _ = await client.call(
            "GET", f"/api/v1/webhooks/{webhook_id}/deliveries/{delivery}"
        )
        assert status == 404, (webhook_id, delivery)
        assert_error(body, "not_found")

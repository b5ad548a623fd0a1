"""POST /webhooks/{id}/test: a real, signed delivery to a real HTTPS receiver; and deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from cryptography.fernet import Fernet

from engine.api.app import build_app
from engine.core.events import Event
from engine.core.ids import delivery_id, new_id
from engine.settings import Settings
from engine.store.deliveries import NewDelivery, insert_events_and_deliveries
from tests.api.conftest import Client, MakeAccount, start_api
from tests.conftest import with_
from tests.receiver import Receiver

DELIVERY_KEYS = {
    "id", "webhookId", "eventId", "event", "status", "attempts", "responseStatus",
    "responseTimeMs", "error", "createdAt", "lastAttemptAt", "nextAttemptAt",
}  # fmt: skip


def contract_verify(secret: str, payload: str, signature: str) -> bool:
    """docs/contract.md §3's snippet, unchanged."""
    expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.split("=")[1])


async def test_test_delivery_is_real_and_signed(client: Client, receiver: Receiver) -> None:
    created = await client.create(
        f"{receiver.url}/hook", ["compliance.warning", "document.uploaded"]
    )
    status, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    assert status == 200
    assert set(record) == DELIVERY_KEYS
    assert record["status"] == "succeeded"
    assert record["attempts"] == 1
    assert record["responseStatus"] == 200
    assert isinstance(record["responseTimeMs"], int)
    assert record["error"] is None
    assert record["nextAttemptAt"] is None
    assert record["lastAttemptAt"] is not None
    assert record["webhookId"] == created["id"]
    assert record["event"] == "compliance.warning"
    assert record["eventId"].startswith("evt_test_")
    assert re.fullmatch(r"dlv_[a-z0-9]+", record["id"])

    [request] = receiver.requests
    assert request.path == "/hook"
    payload = request.body.decode()
    assert contract_verify(created["secret"], payload, request.headers["X-CargoLint-Signature"])
    assert not contract_verify(
        "whsec_test_wrong", payload, request.headers["X-CargoLint-Signature"]
    )
    assert request.headers["X-CargoLint-Delivery"] == record["id"]
    assert request.headers["X-CargoLint-Event"] == "compliance.warning"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("CargoLint-Webhooks/")
    body = orjson.loads(request.body)
    assert body["test"] is True
    assert body["event"] == "compliance.warning"
    assert body["webhookId"] == created["id"]
    assert body["deliveryId"] == record["id"]
    assert body["data"]["document"]["id"].startswith("doc_test_")
    assert body["data"]["warnings"][0]["severity"] in {"low", "medium", "high"}
    assert request.body == orjson.dumps(body)  # compact

    status, listing, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}/deliveries")
    assert status == 200
    assert listing["total"] == 1
    assert listing["data"] == [record]


async def test_batch_test_delivery_uses_batch_sample(client: Client, receiver: Receiver) -> None:
    created = await client.create(f"{receiver.url}/b", ["document.batch_downloaded"])
    status, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    assert (status, record["status"]) == (200, "succeeded")
    body = orjson.loads(receiver.requests[0].body)
    assert body["data"]["batch"]["id"].startswith("batch_test_")


async def test_failed_test_delivery_is_recorded_not_retried(
    client: Client, receiver: Receiver, pool: asyncpg.Pool[Any]
) -> None:
    async def fail(_: web.Request, __: bytes) -> web.StreamResponse:
        return web.Response(status=503, text="down\x00", headers={"Retry-After": "1"})

    receiver.handler = fail
    created = await client.create(f"{receiver.url}/hook", active=False)  # inactive works too
    status, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    assert status == 200
    assert record["status"] == "failed"
    assert record["attempts"] == 1
    assert record["responseStatus"] == 503
    assert record["error"] == "HTTP 503"
    assert record["nextAttemptAt"] is None
    row = await pool.fetchrow(
        "SELECT is_test, next_attempt_at, claimed_by FROM deliveries WHERE id = $1", record["id"]
    )
    assert row is not None
    assert (row["is_test"], row["next_attempt_at"], row["claimed_by"]) == (True, None, None)
    attempts = await pool.fetch(
        "SELECT number, response_status, response_body FROM delivery_attempts"
        " WHERE delivery_id = $1",
        record["id"],
    )
    assert [(a["number"], a["response_status"]) for a in attempts] == [(1, 503)]
    assert attempts[0]["response_body"] == "down\ufffd"


async def test_unreachable_receiver_fails_with_error(client: Client, receiver: Receiver) -> None:
    url = f"{receiver.url}/hook"
    await receiver.stop()
    created = await client.create(url)
    status, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    assert status == 200
    assert record["status"] == "failed"
    assert record["responseStatus"] is None
    assert record["error"].startswith("connection failed")


async def test_deliveries_list_is_newest_first_and_paged(
    client: Client, receiver: Receiver
) -> None:
    created = await client.create(f"{receiver.url}/hook")
    path = f"/api/v1/webhooks/{created['id']}"
    ids = []
    for _ in range(3):
        _, record, _ = await client.call("POST", f"{path}/test")
        ids.append(record["id"])
    status, page, _ = await client.call(
        "GET", f"{path}/deliveries", params={"offset": "1", "limit": "1"}
    )
    assert status == 200
    assert (page["offset"], page["limit"], page["total"]) == (1, 1, 3)
    assert [d["id"] for d in page["data"]] == [ids[1]]
    status, page, _ = await client.call("GET", f"{path}/deliveries")
    assert [d["id"] for d in page["data"]] == ids[::-1]
    assert page["limit"] == 20
    status, page, _ = await client.call("GET", f"{path}/deliveries", params={"offset": "3"})
    assert (page["data"], page["total"]) == ([], 3)


async def _pending_delivery(pool: asyncpg.Pool[Any], webhook_id: str, account_id: str) -> str:
    event = Event(
        id=new_id("evt"),
        type="document.uploaded",
        account_id=account_id,
        mode="test",
        timestamp="2026-03-02T11:45:00Z",
        data=b'{"document":{}}',
    )
    dlv = delivery_id(webhook_id, account_id, event.id)
    async with pool.acquire() as conn, conn.transaction():
        await insert_events_and_deliveries(
            conn, [event], [NewDelivery(dlv, webhook_id, event)], claimed_by=None
        )
    return dlv


async def test_delete_and_deactivate_end_pending_deliveries(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    account = await make_account()
    client = Client(http, api, account.key)
    for method, payload, error in [
        ("DELETE", None, "webhook deleted"),
        ("PUT", {"active": False}, "webhook deactivated"),
    ]:
        created = await client.create("https://example.com/hook")
        dlv = await _pending_delivery(pool, created["id"], account.id)
        status, _, _ = await client.call(method, f"/api/v1/webhooks/{created['id']}", json=payload)
        assert status in (200, 204)
        row = await pool.fetchrow(
            "SELECT status, error, next_attempt_at FROM deliveries WHERE id = $1", dlv
        )
        assert row is not None
        assert (row["status"], row["error"], row["next_attempt_at"]) == ("failed", error, None)


async def test_secrets_are_encrypted_at_rest_when_a_key_is_set(
    http: aiohttp.ClientSession,
    api_settings: Settings,
    pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
    receiver: Receiver,
) -> None:
    settings = with_(api_settings, secret_keys=(Fernet.generate_key().decode(),))
    runner, base = await start_api(settings, pool)
    try:
        client = Client(http, base, (await make_account()).key)
        created = await client.create(f"{receiver.url}/hook")
        stored = await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", created["id"])
        assert stored.startswith("fernet:")
        assert created["secret"] not in stored
        status, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
        assert (status, record["status"]) == (200, "succeeded")
        request = receiver.requests[0]
        assert contract_verify(
            created["secret"], request.body.decode(), request.headers["X-CargoLint-Signature"]
        )
    finally:
        await runner.cleanup()


async def test_a_test_delivery_cut_short_by_shutdown_ends_failed_not_pending(
    api_settings: Settings,
    pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
    receiver: Receiver,
) -> None:
    hung, release = asyncio.Event(), asyncio.Event()

    async def hang(_request: web.Request, _body: bytes) -> web.Response:
        hung.set()
        await release.wait()
        return web.Response(status=200)

    receiver.handler = hang
    # The API with a short shutdown wait, so stopping it cancels the handler mid-attempt.
    runner = web.AppRunner(build_app(api_settings, pool=pool), shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = site.name
    account = await make_account()
    headers = {"X-API-Key": account.key}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/api/v1/webhooks",
                headers=headers,
                json={"url": f"{receiver.url}/hook", "events": ["document.uploaded"]},
            ) as response:
                webhook_id = (await response.json())["id"]

            async def call_test() -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(
                        f"{base}/api/v1/webhooks/{webhook_id}/test", headers=headers
                    ) as response:
                        await response.read()

            call = asyncio.create_task(call_test())
            await asyncio.wait_for(hung.wait(), 10)
            await runner.cleanup()  # cancels the handler waiting on the receiver
            await call
    finally:
        release.set()
    row = await pool.fetchrow(
        "SELECT status, attempts, error, next_attempt_at FROM deliveries WHERE webhook_id = $1",
        webhook_id,
    )
    assert row is not None
    assert row["status"] == "failed"
    assert row["attempts"] == 1
    assert row["error"] == "the API stopped mid-attempt"
    assert row["next_attempt_at"] is None

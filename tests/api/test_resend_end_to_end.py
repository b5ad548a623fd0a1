"""Resend and recover end to end: an event fails for good at a real HTTPS receiver through a
real worker, then the API sends it again and the worker's poller attempts it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from engine.core.ids import random_token
from engine.delivery import Sender
from engine.settings import Settings
from engine.store.accounts import open_account
from engine.store.db import create_pool
from engine.store.migrate import migrate
from engine.worker.main import Worker
from tests.api.conftest import Client, start_api
from tests.api.test_test_delivery import contract_verify
from tests.conftest import drop_database, fresh_vhost, with_
from tests.receiver import Receiver
from tests.worker.helpers import Publisher, cached, dlv, make_event, wait_final

# Each test runs a worker until resent deliveries are delivered again.
pytestmark = pytest.mark.slow


@dataclass
class Stack:
    """The API and one worker on a database and vhost of their own (no other test's rows)."""

    pool: asyncpg.Pool[Any]
    client: Client
    account_id: str
    worker: Worker
    publisher: Publisher


@pytest.fixture
async def stack(settings: Settings, http: aiohttp.ClientSession) -> AsyncIterator[Stack]:
    name = f"cargolint_test_{random_token(10)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    await migrate(url)
    try:
        with fresh_vhost(name) as amqp_url:
            pool = await create_pool(url)
            # The production poll interval: a resent delivery waits for the next poll.
            own = with_(
                settings,
                database_url=url,
                amqp_url=amqp_url,
                metrics_port=0,
                retry_schedule=(0.2, 0.4),
                poll_interval=0.5,
                delivery_timeout=2.0,
                worker_lease=2.0,
                shutdown_grace=3.0,
            )
            runner, base = await start_api(own, pool)
            sender = Sender(own)
            worker = Worker(own, pool=pool, sender=sender)
            try:
                async with pool.acquire() as conn:
                    issued = await open_account(conn, name="E2E", plan="business", mode="live")
                await worker.start()
                async with Publisher(amqp_url) as publisher:
                    client = Client(http, base, issued.api_key)
                    yield Stack(pool, client, issued.account_id, worker, publisher)
            finally:
                await worker.stop(grace=0.5)
                await sender.close()
                await runner.cleanup()
                await pool.close()
    finally:
        await drop_database(name)


def _failing_until_told(receiver: Receiver) -> asyncio.Event:
    healthy = asyncio.Event()

    async def answer(_: web.Request, __: bytes) -> web.StreamResponse:
        if healthy.is_set():
            return web.Response(status=200, text="thanks")
        return web.Response(status=500, text="down")

    receiver.handler = answer
    return healthy


async def _failed_for_good(stack: Stack, webhook_id: str, count: int) -> list[str]:
    """Publish `count` events and wait until each delivery has used up its schedule."""
    events = [make_event(stack.account_id, "document.uploaded") for _ in range(count)]
    for event in events:
        await stack.publisher.publish(event)
    ids = [dlv(webhook_id, stack.account_id, e) for e in events]
    rows = await wait_final(stack.pool, ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("failed", 3)}
    return ids


async def test_a_resent_delivery_is_attempted_again_with_the_same_id_and_payload(
    stack: Stack, receiver: Receiver
) -> None:
    healthy = _failing_until_told(receiver)
    created = await stack.client.create(f"{receiver.url}/hook")
    await cached(stack.worker, created["id"])
    (delivery,) = await _failed_for_good(stack, created["id"], 1)
    first = receiver.requests[0]
    path = f"/api/v1/webhooks/{created['id']}/deliveries/{delivery}"

    healthy.set()
    status, record, _ = await stack.client.call("POST", f"{path}/retry")
    assert (status, record["status"], record["attempts"]) == (202, "pending", 3)
    (*_, again) = await receiver.wait_for(4)
    assert again.headers["X-CargoLint-Delivery"] == delivery
    assert again.body == first.body
    assert contract_verify(
        created["secret"], again.body.decode(), again.headers["X-CargoLint-Signature"]
    )
    rows = await wait_final(stack.pool, [delivery])
    assert (rows[delivery]["status"], rows[delivery]["attempts"]) == ("succeeded", 4)

    status, detail, _ = await stack.client.call("GET", path)
    assert [a["number"] for a in detail["attemptLog"]] == [1, 2, 3, 4]
    assert [a["responseStatus"] for a in detail["attemptLog"]] == [500, 500, 500, 200]
    assert detail["attemptLog"][-1]["responseBody"] == "thanks"
    assert orjson.dumps(detail["payload"]) == again.body


async def test_recover_brings_back_every_failed_delivery(stack: Stack, receiver: Receiver) -> None:
    healthy = _failing_until_told(receiver)
    created = await stack.client.create(f"{receiver.url}/hook")
    await cached(stack.worker, created["id"])
    ids = await _failed_for_good(stack, created["id"], 3)
    since = await stack.pool.fetchval(
        "SELECT min(created_at) FROM deliveries WHERE id = ANY($1::text[])", ids
    )

    healthy.set()
    status, body, _ = await stack.client.call(
        "POST",
        f"/api/v1/webhooks/{created['id']}/recover",
        json={"since": since.isoformat()},
    )
    assert (status, body) == (202, {"recovered": 3})
    rows = await wait_final(stack.pool, ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("succeeded", 4)}
    delivered = {r.headers["X-CargoLint-Delivery"] for r in receiver.requests[-3:]}
    assert delivered == set(ids)
    # Nothing failed is left to recover.
    status, body, _ = await stack.client.call(
        "POST",
        f"/api/v1/webhooks/{created['id']}/recover",
        json={"since": since.isoformat()},
    )
    assert (status, body) == (202, {"recovered": 0})

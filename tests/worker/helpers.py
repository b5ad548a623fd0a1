"""Helpers for worker tests: accounts and webhooks in Postgres, events on RabbitMQ, waiting."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson

from engine.core.crypto import SecretBox
from engine.core.ids import delivery_id, new_id, random_token
from engine.settings import Settings
from engine.store.webhooks import create_webhook, delete_webhook, update_webhook
from engine.worker.topology import EXCHANGE, declare_topology

ALL_TYPES = ("document.uploaded", "compliance.warning", "document.batch_downloaded")


def verify_signature(secret: str, payload: bytes, signature: str) -> bool:
    """The verification snippet from the public docs (docs/contract.md §3), unchanged."""
    payload_text = payload.decode()
    expected = hmac.new(secret.encode(), payload_text.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.split("=")[1])


def event_data(event_type: str) -> dict[str, Any]:
    document = {
        "id": f"doc_{random_token(8)}",
        "fileName": "invoice.pdf",
        "documentType": "invoice",
        "status": "processing",
    }
    if event_type == "document.uploaded":
        return {"document": document}
    if event_type == "compliance.warning":
        return {
            "document": document,
            "warnings": [{"code": "missing_hs_code", "message": "no HS code", "severity": "high"}],
        }
    return {
        "batch": {
            "id": f"batch_{random_token(8)}",
            "documentIds": ["doc_a", "doc_b"],
            "documentCount": 2,
            "archiveName": "batch.zip",
        }
    }


def make_event(
    account_id: str,
    event_type: str = "document.uploaded",
    *,
    mode: str | None = "live",
    event_id: str | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": event_id or new_id("evt", 16),
        "event": event_type,
        "accountId": account_id,
        "timestamp": "2026-03-02T11:45:00Z",
        "data": event_data(event_type),
    }
    if mode is not None:
        event["mode"] = mode
    return event


async def make_account(pool: asyncpg.Pool[Any]) -> str:
    account_id = new_id("acct", 16)
    await pool.execute(
        "INSERT INTO accounts (id, name, plan) VALUES ($1, $2, 'business')", account_id, "t"
    )
    return account_id


async def make_webhook(
    pool: asyncpg.Pool[Any],
    settings: Settings,
    account_id: str,
    url: str,
    *,
    events: Iterable[str] = ALL_TYPES,
    mode: str = "live",
    active: bool = True,
) -> tuple[str, str]:
    """Create a webhook as the API does (committed, then NOTIFY); return (id, secret)."""
    async with pool.acquire() as conn:
        row, secret = await create_webhook(
            conn,
            account_id=account_id,
            mode=mode,
            url=url,
            events=list(events),
            active=active,
            description=None,
            box=SecretBox(settings.secret_keys),
            limit=1000,
        )
    return row["id"], secret


async def remove_webhook(pool: asyncpg.Pool[Any], account_id: str, webhook_id: str) -> None:
    async with pool.acquire() as conn:
        await delete_webhook(conn, account_id=account_id, mode="live", webhook_id=webhook_id)


async def deactivate_webhook(pool: asyncpg.Pool[Any], account_id: str, webhook_id: str) -> None:
    async with pool.acquire() as conn:
        await update_webhook(
            conn,
            account_id=account_id,
            mode="live",
            webhook_id=webhook_id,
            changes={"active": False},
        )


class Publisher:
    """Publishes to `cargolint.events` as an upstream service would, with confirms."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self.exchange: aio_pika.abc.AbstractExchange | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Publisher:
        self._connection = await aio_pika.connect(self._url)
        self.channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(self.channel)
        self.exchange = await self.channel.get_exchange(EXCHANGE)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(
        self,
        body: dict[str, Any] | bytes,
        routing_key: str | None = None,
        *,
        message_id: str | None = None,
    ) -> None:
        assert self.exchange is not None
        if isinstance(body, dict):
            routing_key = routing_key or str(body.get("event", "unknown"))
            raw = orjson.dumps(body)
        else:
            raw = body
        await self.exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                headers={"x-upstream": "tests"},
            ),
            routing_key=routing_key or "unknown",
        )

    async def publish_many(self, bodies: Iterable[dict[str, Any]], concurrency: int = 200) -> None:
        """Publish many with confirms in flight together (the publisher is not under test)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                await self.publish(body)

        await asyncio.gather(*(one(b) for b in bodies))


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, every: float = 0.05
) -> None:
    """Poll `check` (a plain or async predicate) until it is true, else fail."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(every)


async def insert_pending(
    pool: asyncpg.Pool[Any],
    id_prefix: str,
    count: int,
    *,
    webhook_id: str,
    account_id: str,
    due_in: timedelta = timedelta(0),
    claimed_by: str | None = None,
) -> None:
    """`count` pending deliveries `<id_prefix>1` … of no stored event, due `due_in` from now:
    rows for tests of what the store's statements read, made in one statement."""
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type,
                                   next_attempt_at, claimed_by)
           SELECT $1 || g, $2, $3, 'evt_' || g, 't', now() + $5::interval, $6
           FROM generate_series(1, $4::int) g""",
        id_prefix,
        webhook_id,
        account_id,
        count,
        due_in,
        claimed_by,
    )


async def statuses(pool: asyncpg.Pool[Any], ids: Iterable[str]) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM deliveries WHERE id = ANY($1::text[])", list(ids))
    return {r["id"]: r for r in rows}


async def wait_final(
    pool: asyncpg.Pool[Any], ids: Iterable[str], *, timeout: float = 15.0
) -> dict[str, asyncpg.Record]:
    """Wait until every delivery has reached `succeeded` or `failed`; return their rows."""
    wanted = list(ids)
    rows: dict[str, asyncpg.Record] = {}

    async def done() -> bool:
        nonlocal rows
        rows = await statuses(pool, wanted)
        return len(rows) == len(wanted) and all(r["status"] != "pending" for r in rows.values())

    await eventually(done, timeout=timeout)
    return rows


def dlv(webhook_id: str, account_id: str, event: dict[str, Any]) -> str:
    return delivery_id(webhook_id, account_id, event["id"])


async def cached(worker: Any, *webhook_ids: str, timeout: float = 2.0) -> None:
    """Wait until the worker's cache holds these webhooks (NOTIFY reached it)."""

    await eventually(
        lambda: all(worker.cache.get(w) is not None for w in webhook_ids),
        timeout=timeout,
        every=0.01,
    )


async def subscribed(
    worker: Any, pool: asyncpg.Pool[Any], settings: Any, url: str
) -> tuple[str, str, str]:
    """A new account with one webhook on `url`, already in the worker's cache:
    (account id, webhook id, secret)."""
    account = await make_account(pool)
    webhook_id, secret = await make_webhook(pool, settings, account, url)
    await cached(worker, webhook_id)
    return account, webhook_id, secret


@dataclass(frozen=True, slots=True)
class OneDelivery:
    """A new account's webhook, the one event published for it, and its delivery's id."""

    account: str
    webhook_id: str
    secret: str
    event: dict[str, Any]
    id: str


async def publish_one(
    worker: Any, pool: asyncpg.Pool[Any], settings: Any, publisher: Publisher, url: str
) -> OneDelivery:
    """A new account with one webhook on `url` (`subscribed`), and one event of it published."""
    account, webhook_id, secret = await subscribed(worker, pool, settings, url)
    event = make_event(account)
    await publisher.publish(event)
    return OneDelivery(account, webhook_id, secret, event, dlv(webhook_id, account, event))

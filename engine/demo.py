"""`cargolint-webhooks demo`: the whole flow on this machine, end to end, for a first look.

Migrates, starts a local HTTPS receiver with its own CA, the API and a worker (the real
commands, as subprocesses), creates a demo account and key, registers a webhook through the
API, sends a test delivery, publishes one event of each type, and prints each delivery as the
receiver verified its signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import trustme
from aiohttp import web

from engine.core.events import EVENT_TYPES
from engine.core.ids import random_token
from engine.settings import Settings
from engine.store import accounts
from engine.store.db import connect
from engine.store.migrate import migrate

__all__ = ["run"]

EXCHANGE = "cargolint.events"
READY_TIMEOUT = 30.0

SAMPLE_DATA: dict[str, dict[str, Any]] = {
    "document.uploaded": {
        "document": {
            "id": "doc_abc123",
            "fileName": "invoice.pdf",
            "documentType": "invoice",
            "status": "processing",
        }
    },
    "compliance.warning": {
        "document": {
            "id": "doc_abc123",
            "fileName": "invoice.pdf",
            "documentType": "invoice",
            "status": "needs_review",
        },
        "warnings": [
            {"code": "missing_hs_code", "message": "Line 3 has no HS code", "severity": "high"}
        ],
    },
    "document.batch_downloaded": {
        "batch": {
            "id": "batch_9x8y7z",
            "documentIds": ["doc_abc123", "doc_def456"],
            "documentCount": 2,
            "archiveName": "march-shipments.zip",
        }
    },
}


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DemoReceiver:
    """A customer's HTTPS endpoint: verifies each signature with the docs' snippet."""

    def __init__(self) -> None:
        self.secret = ""
        self.seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        payload = (await request.read()).decode()
        signature = request.headers.get("X-CargoLint-Signature", "")
        expected = hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        verified = "=" in signature and hmac.compare_digest(expected, signature.split("=")[1])
        body = orjson.loads(payload)
        await self.seen.put({"headers": dict(request.headers), "body": body, "verified": verified})
        return web.Response(status=200 if verified else 401, text="ok" if verified else "bad")


@contextlib.asynccontextmanager
async def https_server(app: web.Application, context: ssl.SSLContext) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def subprocess_command(name: str, env: dict[str, str]) -> AsyncIterator[None]:
    """Run `cargolint-webhooks NAME` until the block ends, then SIGTERM it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        name,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(session: aiohttp.ClientSession, url: str, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready at {url}")
        await asyncio.sleep(0.2)


async def run(settings: Settings) -> int:
    say("CargoLint Webhooks demo")
    logging.getLogger().setLevel(logging.WARNING)  # the walk-through speaks for itself
    applied = await migrate(settings.database_url, secret_keys=settings.secret_keys)
    say(f"  database ready ({len(applied)} migrations applied now)")

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    receiver = DemoReceiver()
    app = web.Application()
    app.router.add_post("/cargolint", receiver.handle)

    with tempfile.TemporaryDirectory(prefix="cargolint-demo-") as tmp:
        ca_file = Path(tmp) / "demo-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        api_port, metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "CARGOLINT_DATABASE_URL": settings.database_url,
            "CARGOLINT_AMQP_URL": settings.amqp_url,
            "CARGOLINT_API_HOST": "127.0.0.1",
            "CARGOLINT_API_PORT": str(api_port),
            "CARGOLINT_METRICS_PORT": str(metrics_port),
            # The demo's receiver lives on this machine, behind its own CA.
            "CARGOLINT_ALLOWED_NETWORKS": "127.0.0.0/8",
            "CARGOLINT_CA_BUNDLE": str(ca_file),
        }
        async with (
            https_server(app, server_context) as receiver_port,
            subprocess_command("api", env),
            subprocess_command("worker", env),
            aiohttp.ClientSession() as http,
        ):
            api = f"http://127.0.0.1:{api_port}/api/v1"
            await wait_ready(http, f"http://127.0.0.1:{api_port}/healthz", "the API")
            await wait_ready(http, f"http://127.0.0.1:{metrics_port}/readyz", "the worker")
            say(
                f"  API on :{api_port}, worker metrics on :{metrics_port}, "
                f"receiver on https://127.0.0.1:{receiver_port}/cargolint"
            )
            return await _walk_through(settings, http, api, receiver, receiver_port)
    return 1  # pragma: no cover - unreachable; keeps mypy sure of the return


async def _walk_through(
    settings: Settings,
    http: aiohttp.ClientSession,
    api: str,
    receiver: DemoReceiver,
    receiver_port: int,
) -> int:
    conn = await connect(settings.database_url)
    try:
        account_id, api_key = await accounts.create_account(
            conn, name="Demo Freight Ltd", plan="business", mode="live"
        )
    finally:
        await conn.close()
    say(f"  account {account_id} (business plan) with a live API key sk_live_…")
    headers = {"X-API-Key": api_key}

    async with http.post(
        f"{api}/webhooks",
        headers=headers,
        json={
            "url": f"https://127.0.0.1:{receiver_port}/cargolint",
            "events": list(EVENT_TYPES),
            "description": "demo receiver",
        },
    ) as response:
        webhook = await response.json()
        if response.status != 201:
            say(f"  creating the webhook failed: {response.status} {webhook}")
            return 1
    receiver.secret = webhook["secret"]
    say(f"  POST /webhooks → 201 {webhook['id']} for {', '.join(webhook['events'])}")

    async with http.post(f"{api}/webhooks/{webhook['id']}/test", headers=headers) as response:
        test = await response.json()
    seen = await asyncio.wait_for(receiver.seen.get(), 30)
    say(
        f"  POST /webhooks/{webhook['id']}/test → {test['status']} "
        f"(HTTP {test['responseStatus']}, signature {'verified' if seen['verified'] else 'BAD'})"
    )

    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        run_id = random_token(6)
        for event_type in EVENT_TYPES:
            message = {
                "id": f"evt_demo_{run_id}_{event_type.replace('.', '_')}",
                "event": event_type,
                "accountId": account_id,
                "mode": "live",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": SAMPLE_DATA[event_type],
            }
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(message),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=event_type,
            )
        say(f"  published {len(EVENT_TYPES)} events to {EXCHANGE}")

    ok = True
    for _ in EVENT_TYPES:
        try:
            seen = await asyncio.wait_for(receiver.seen.get(), 60)
        except TimeoutError:
            say("  a delivery did not arrive within 60 s")
            return 1
        body, h = seen["body"], seen["headers"]
        ok = ok and seen["verified"]
        say(
            f"  received {body['event']:<26} delivery {h['X-CargoLint-Delivery']} "
            f"signature {'verified' if seen['verified'] else 'BAD'}"
        )

    deliveries = await _settled_deliveries(http, api, headers, webhook["id"], 1 + len(EVENT_TYPES))
    for record in deliveries:
        say(
            f"  record {record['id']} {record['event']:<26} {record['status']:<9} "
            f"attempts={record['attempts']} HTTP {record['responseStatus']} "
            f"in {record['responseTimeMs']} ms"
        )
    ok = ok and all(r["status"] == "succeeded" for r in deliveries)
    say("demo finished: every delivery verified" if ok else "demo finished with problems")
    return 0 if ok else 1


async def _settled_deliveries(
    http: aiohttp.ClientSession, api: str, headers: dict[str, str], webhook_id: str, count: int
) -> list[dict[str, Any]]:
    """The webhook's delivery records once `count` of them are no longer pending."""
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"{api}/webhooks/{webhook_id}/deliveries", headers=headers) as r:
            data: list[dict[str, Any]] = (await r.json())["data"]
        settled = [d for d in data if d["status"] != "pending"]
        if len(settled) >= count or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.2)

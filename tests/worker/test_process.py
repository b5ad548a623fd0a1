"""The real worker process: kill -9 mid-run, SIGTERM mid-run, and its health endpoints."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from engine.settings import Settings
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    eventually,
    make_account,
    make_event,
    make_webhook,
    wait_final,
)
from tests.worker.process import WorkerProcess, worker_env

Env = Callable[..., dict[str, str]]


@pytest.fixture
async def processes(wsettings: Settings, ca_file: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[WorkerProcess] = []

    async def start(**extra: str) -> WorkerProcess:
        process = WorkerProcess(worker_env(wsettings, ca_file, **extra))
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        await process.kill()


def _received_ids(receiver: Receiver) -> Counter[str]:
    return Counter(r.headers["X-CargoLint-Delivery"] for r in receiver.requests)


@pytest.mark.slow
async def test_kill_9_mid_run_then_restart_loses_nothing(
    processes: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    events = [make_event(account) for _ in range(2000)]
    expected = {dlv(webhook_id, account, e) for e in events}

    first = await processes()
    publishing = asyncio.create_task(publisher.publish_many(events))
    await receiver.wait_for(300, timeout=60)
    await first.kill()
    killed_at = len(receiver.requests)
    await publishing

    second = await processes()
    rows = await wait_final(pool, expected, timeout=90)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    received = _received_ids(receiver)
    assert set(received) == expected  # every delivery arrived at least once
    duplicates = sum(received.values()) - len(expected)
    # Only attempts in flight (or made but not yet recorded) when the worker died repeat.
    assert duplicates <= 2 * wsettings.endpoint_concurrency + 20, duplicates
    assert killed_at < len(expected)  # it really died mid-run
    assert await second.terminate() == 0


@pytest.mark.slow
async def test_sigterm_mid_run_exits_0_within_grace_and_loses_nothing(
    processes: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    async def slow(_: web.Request, __: bytes) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response()

    receiver.handler = slow
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    events = [make_event(account) for _ in range(300)]
    expected = {dlv(webhook_id, account, e) for e in events}

    worker = await processes(CARGOLINT_SHUTDOWN_GRACE="3")
    await publisher.publish_many(events)
    await receiver.wait_for(30, timeout=30)
    stopped = time.monotonic()
    assert await worker.terminate() == 0
    assert time.monotonic() - stopped < 3 + 2  # the grace, plus start-up slack
    stopping = [e for e in worker.logs if e.get("msg") == "worker stopped"]
    assert stopping, worker.logs[-5:]
    # It released its claims and left: nothing waits for its lease to run out.
    assert await pool.fetchval("SELECT count(*) FROM workers WHERE id = $1", worker.worker_id) == 0
    held = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE claimed_by = $1", worker.worker_id
    )
    assert held == 0

    receiver.handler = None
    await processes()
    rows = await wait_final(pool, expected, timeout=60)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert set(_received_ids(receiver)) == expected


async def test_health_endpoints_and_metrics(
    processes: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    worker = await processes()
    base = f"http://127.0.0.1:{worker.metrics_port}"
    event = make_event(account)
    await publisher.publish(event)
    await wait_final(pool, [dlv(webhook_id, account, event)])
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as response:
            assert response.status == 200
        async with session.get(base + "/readyz") as response:
            assert response.status == 200
            assert orjson.loads(await response.read())["checks"] == {
                "broker": True,
                "database": True,
                "cache": True,
            }

        async def scraped() -> bool:
            async with session.get(base + "/metrics") as response:
                text = await response.text()
            return (
                'cargolint_webhooks_deliveries_total{event_type="document.uploaded",outcome="succeeded"}'
                in text
            )

        await eventually(scraped)
        async with session.get(base + "/metrics") as response:
            text = await response.text()
    for name in (
        "cargolint_webhooks_events_consumed_total",
        "cargolint_webhooks_deliveries_created_total",
        "cargolint_webhooks_delivery_attempts_total",
        "cargolint_webhooks_delivery_attempt_duration_seconds_bucket",
        "cargolint_webhooks_event_to_first_attempt_seconds_bucket",
        "cargolint_webhooks_cache_webhooks",
        "cargolint_webhooks_consumer_up 1.0",
        "cargolint_webhooks_build_info",
    ):
        assert name in text, name
    assert await worker.terminate() == 0

"""Worker fixtures: an in-process worker on the session's database and vhost, a publisher,
and as many HTTPS receivers as a test needs."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from engine.delivery import Sender
from engine.settings import Settings
from engine.worker.main import Worker
from tests.conftest import with_
from tests.receiver import Receiver
from tests.worker.helpers import Publisher

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture(scope="session")
def wsettings(settings: Settings, amqp_url: str) -> Settings:
    """Fast settings: a compressed retry schedule, short timeouts and leases."""
    return with_(
        settings,
        amqp_url=amqp_url,
        metrics_port=0,
        delivery_timeout=1.0,
        retry_schedule=(0.2, 0.4),
        endpoint_rate=1000.0,
        endpoint_concurrency=10,
        poll_interval=0.05,
        worker_lease=2.0,
        shutdown_grace=3.0,
    )


@pytest.fixture
async def start_worker(wsettings: Settings, pool: asyncpg.Pool[Any]) -> AsyncIterator[StartWorker]:
    """Start in-process workers (settings may be overridden); all are stopped at the end."""
    started: list[tuple[Worker, Sender]] = []

    async def start(**changes: Any) -> Worker:
        settings = with_(wsettings, **changes)
        sender = Sender(settings)
        try:
            worker = Worker(settings, pool=pool, sender=sender)
        except BaseException:
            await sender.close()
            raise
        started.append((worker, sender))
        await worker.start()
        return worker

    yield start
    for worker, sender in reversed(started):
        try:
            await worker.stop(grace=0.5)
        finally:
            await sender.close()


@pytest.fixture
async def worker(start_worker: StartWorker) -> Worker:
    return await start_worker()


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[Publisher]:
    async with Publisher(amqp_url) as publisher:
        yield publisher


@pytest.fixture
async def make_receiver(server_ssl: ssl.SSLContext) -> AsyncIterator[Callable[..., Any]]:
    """Start extra HTTPS receivers (each with its own port, so its own endpoint)."""
    receivers: list[Receiver] = []

    async def make(ssl_context: ssl.SSLContext | None = None) -> Receiver:
        receiver = await Receiver(ssl_context or server_ssl).start()
        receivers.append(receiver)
        return receiver

    yield make
    for receiver in receivers:
        await receiver.stop()

"""Postgres connections cut under a running worker: it recovers by itself and loses nothing.

The machine's Postgres stays up (the chaos suite restarts whole servers on its own ports); here
the worker's backends are killed with pg_terminate_backend, which is what a restart or a
network cut looks like from the worker's side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from engine.settings import Settings
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    make_account,
    make_event,
    make_webhook,
    wait_final,
)
from tests.worker.process import WorkerProcess, worker_env

APP = "cargolint_faulty_worker"


@pytest.fixture
async def faulty_worker(wsettings: Settings, ca_file: Path) -> AsyncIterator[WorkerProcess]:
    env = worker_env(
        wsettings,
        ca_file,
        CARGOLINT_DATABASE_URL=f"{wsettings.database_url}?application_name={APP}",
    )
    process = await WorkerProcess(env).start()
    yield process
    await process.kill()


async def _cut(pool: asyncpg.Pool[Any]) -> int:
    killed: int = await pool.fetchval(
        """SELECT count(*) FROM (
               SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE application_name = $1 AND datname = current_database()) AS t""",
        APP,
    )
    return killed


@pytest.mark.slow
async def test_worker_rides_out_cut_database_connections(
    faulty_worker: WorkerProcess,
    publisher: Publisher,
    make_receiver: Callable[..., Any],
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    receiver: Receiver = await make_receiver()
    account = await make_account(pool)
    webhook_id, _ = await make_webhook(pool, wsettings, account, receiver.url)
    events = [make_event(account) for _ in range(600)]
    expected = {dlv(webhook_id, account, e) for e in events}

    publishing = asyncio.create_task(publisher.publish_many(events))
    cuts = 0
    for _ in range(4):
        await asyncio.sleep(0.4)
        cuts += await _cut(pool)
    await publishing
    assert cuts >= 4  # the pool and the listener were really cut

    rows = await wait_final(pool, expected, timeout=60)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert {r.headers["X-CargoLint-Delivery"] for r in receiver.requests} == expected

    # The change listener came back too: a webhook created now gets the next event.
    late: Receiver = await make_receiver()
    late_id, _ = await make_webhook(pool, wsettings, account, late.url)
    await asyncio.sleep(1.0)
    event = make_event(account)
    await publisher.publish(event)
    (request,) = await late.wait_for(1, timeout=10)
    assert orjson.loads(request.body)["webhookId"] == late_id
    assert faulty_worker.proc is not None and faulty_worker.proc.returncode is None
    assert await faulty_worker.terminate() == 0

"""The recover scenario: `POST /webhooks/{id}/recover` of 100,000 failed deliveries through a
real API process while another webhook's traffic flows through the worker.

The failed deliveries (and their events) are inserted straight into Postgres for one webhook on
its own endpoint, as a week of a dead receiver would have left them. The other traffic is the
throughput scenario's — one webhook, one endpoint, 1 KiB bodies — paced at half of
throughput's rate, as latency's is: then its throughput and its publish-to-receipt p99 can both
be read, in two windows of the same length and the same worker, one before the call and one
that starts with it (the recover statement, then the first of the 100,000 deliveries it brings
back, which share the worker with the traffic). A saturated worker would show nothing but
fairness here: it gives two healthy endpoints half of its time each, by design.

Figures: `recover_s` (the call, target < 5 s), `recover_throughput_ratio` (the traffic's
deliveries per second in the window with the call ÷ without, target ≥ 0.90), `recover_p99_ms`
(the traffic's p99 in the window with the call; `recover_p99_ms_before` in the extras is the
other window's) and, in the extras, how many recovered deliveries arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

import aiohttp
import orjson

from bench.data import SECRET_KEY, Webhook, counts, insert_webhooks, wait_settled, webhook_id
from bench.payload import EVENT_TYPE, SECRET, TIMESTAMP
from bench.procs import READY_TIMEOUT, free_port
from engine.core.crypto import SecretBox
from engine.store.accounts import create_account

if TYPE_CHECKING:
    from bench.scenarios import Bench

__all__ = ["recover"]

FAILED = 100_000
FAILED_QUICK = 10_000
WINDOW = 4.0  # seconds of paced traffic in each window
WINDOW_QUICK = 2.0
FALLBACK_RATE = 300.0  # events/s when throughput was not measured in this run

# The recovered deliveries' event data: no `t=` stamp, so the receiver takes no latency from
# them and the p99 is the traffic's alone.
_DATA = orjson.dumps(
    {
        "document": {
            "id": "doc_recovered",
            "fileName": "recovered.pdf",
            "documentType": "invoice",
            "status": "processing",
        }
    }
)


async def recover(b: Bench) -> None:
    """Recover the failed deliveries of one webhook while another's traffic runs."""
    # bench.scenarios lists this scenario, so it is imported here, not at the top.
    from bench.scenarios import FAST_LIMITS, QUICK

    quick = b.sizes == QUICK
    failed = FAILED_QUICK if quick else FAILED
    window = WINDOW_QUICK if quick else WINDOW
    rate = b.rate or max(50.0, (b.figures.get("throughput_rps") or 2 * FALLBACK_RATE) / 2)

    traffic = Webhook(webhook_id("rt", 0), "acct_rt", b.receiver.url("ok", 0))
    await insert_webhooks(b.pool, [traffic])
    async with b.pool.acquire() as conn:
        account, key = await create_account(
            conn, name="bench recover", plan="business", mode="live"
        )
    dead = webhook_id("rc", 0)
    await _insert_failed(b, dead, account, b.receiver.url("ok", 1), failed)

    async with b.worker("recover", **FAST_LIMITS) as worker, _api(b) as api:
        # Warm up: connections open, caches loaded, the paced publisher running.
        await _window(b, traffic, "warm", rate, 1.0)
        before = await _window(b, traffic, "before", rate, window)
        call: asyncio.Task[tuple[float, int]] = asyncio.create_task(_call(api, key, dead))
        during = await _window(b, traffic, "during", rate, window, until=call)
        recover_s, recovered = await call
        # The API paces what it recovers at the endpoint's rate: the first come due at once.
        arrived, _ = await wait_settled(b.pool, [dead], 1, b.sizes.wait)
        b.results.extra["recover_worker_rss_mb"] = round(worker.rss_mb(), 1)
    await b.after_worker()

    b.figures["recover_s"] = recover_s
    b.figures["recover_throughput_ratio"] = during.rate / before.rate if before.rate else None
    b.results.extra["recover_rate"] = round(rate, 1)
    b.results.extra["recover_traffic_rps_before"] = round(before.rate, 1)
    b.results.extra["recover_traffic_rps_during"] = round(during.rate, 1)
    b.figures["recover_p99_ms"] = during.p99_ms
    b.results.extra["recover_p99_ms_before"] = before.p99_ms
    b.results.extra["recover_recovered_delivered"] = arrived.succeeded
    b.results.check(
        "recover: every failed delivery recovered", recovered == failed, f"{recovered} of {failed}"
    )
    b.results.check(
        "recover: the traffic arrived in both windows",
        before.delivered == before.published and during.delivered == during.published,
        f"{before.delivered} of {before.published}, {during.delivered} of {during.published}",
    )
    b.results.check(
        "recover: recovered deliveries were delivered",
        arrived.succeeded > 0,
        f"{arrived.succeeded}",
    )


class _Measured:
    def __init__(self, published: int, delivered: int, seconds: float, p99: float | None) -> None:
        self.published = published
        self.delivered = delivered
        self.rate = delivered / seconds if seconds > 0 else 0.0
        self.p99_ms = round(p99 * 1000, 1) if p99 is not None else None


async def _window(
    b: Bench,
    traffic: Webhook,
    name: str,
    rate: float,
    seconds: float,
    *,
    until: asyncio.Task[tuple[float, int]] | None = None,
) -> _Measured:
    """Publish paced traffic for `seconds`, and on until `until` is done; return its
    deliveries per second over the time they took to arrive (from the window's start) and its
    p99."""
    await b.receiver.reset()
    done = (await counts(b.pool, [traffic.id])).succeeded
    started = time.time()
    published = 0
    while time.time() - started < seconds or (until is not None and not until.done()):
        events = [(f"evt_rt_{name}_{published + i}", traffic.account_id) for i in range(int(rate))]
        await b.publisher.paced(events, rate)  # a second's worth at a time
        published += len(events)
    settled, settled_at = await wait_settled(b.pool, [traffic.id], done + published, b.sizes.wait)
    stats = await b.receiver.stats()
    delivered = settled.succeeded - done
    return _Measured(published, delivered, settled_at - started, stats["latency"]["p99"])


async def _call(api: str, key: str, webhook: str) -> tuple[float, int]:
    """POST recover since a day ago; return the call's seconds and how many it recovered."""
    since = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        async with session.post(
            f"{api}/api/v1/webhooks/{webhook}/recover",
            json={"since": since},
            headers={"X-API-Key": key},
        ) as response:
            body = await response.json()
            seconds = time.perf_counter() - started
            if response.status != 202:
                raise RuntimeError(f"recover answered {response.status}: {body}")
    return seconds, int(body["recovered"])


async def _insert_failed(b: Bench, webhook: str, account: str, url: str, n: int) -> None:
    """The webhook on its own endpoint and `n` events with one failed delivery each, as after
    eight failed attempts (created over the last hours), in a few statements."""
    sealed = SecretBox((SECRET_KEY,)).seal(SECRET)
    async with b.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO webhooks (id, account_id, mode, url, events, active, secret)
               VALUES ($1, $2, 'live', $3, $4, true, $5)""",
            webhook,
            account,
            url,
            [EVENT_TYPE],
            sealed,
        )
        await conn.execute(
            """INSERT INTO events (account_id, id, mode, type, "timestamp", data)
               SELECT $1, 'evt_rc_' || g, 'live', $2, $3, $4
               FROM generate_series(1, $5::int) g""",
            account,
            EVENT_TYPE,
            TIMESTAMP,
            _DATA,
            n,
        )
        await conn.execute(
            """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status,
                                       attempts, response_status, error, created_at,
                                       last_attempt_at, next_attempt_at)
               SELECT 'dlv_rc' || lpad(g::text, 20, '0'), $1, $2, 'evt_rc_' || g, $3,
                      'failed', 8, 503, 'HTTP 503',
                      now() - interval '12 hours' + g * interval '100 ms', now(), NULL
               FROM generate_series(1, $4::int) g""",
            webhook,
            account,
            EVENT_TYPE,
            n,
        )
    await b.pool.execute("VACUUM (ANALYZE) deliveries, events")


@contextlib.asynccontextmanager
async def _api(b: Bench) -> AsyncIterator[str]:
    """`python -m engine api` on a free port, on this run's database; yields its base URL."""
    port = free_port()
    env = {**os.environ, **b.env(), "CARGOLINT_API_PORT": str(port)}
    log: IO[bytes] = (b.workdir / "api-recover.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "api", env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _ready(process, base, b.workdir / "api-recover.log")
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def _ready(process: asyncio.subprocess.Process, base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the API exited with {process.returncode}; see {log}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the API was not ready within {READY_TIMEOUT:g}s; see {log}")

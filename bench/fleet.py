"""Two scenarios about a fleet of workers and many tenants, run when named
(`--only fleet fairness`).

`fleet`: for 1, 2 and 3 worker processes, (a) deliveries/s and worker CPU per delivery over the
receiver's `ok` endpoints, one account each, with no rate limit, after a warm-up (runs in the
order 1, 2, 3, 3, 2, 1 workers, summed per count), and (b) a backlog at one
endpoint limited to `RATE` requests a second (burst `RATE`): the worst 1-second window counted
at the receiver ÷ the R x (1 + 1) allowed, and the most requests in flight there. Figures:
`fleet_window_ratio` (3 workers, target ≤ 1.10) and `fleet_cpu_ratio` (CPU per delivery, 3
workers ÷ 1, target ≤ 1.10). Every core is shared by the workers, the receivers, RabbitMQ and
Postgres, so the deliveries/s show what the coordination costs, not how far a fleet scales.

`fairness`: one account's endpoint answers after 200 ms, with a backlog of 100,000 deliveries
(far beyond what a worker holds in memory); meanwhile another account's events, paced, go to
its idle endpoint. Figure: `fairness_p99_ms`, the p99 from publication to arrival of the light
tenant's events (target < 1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from bench.data import Webhook, counts, insert_webhooks, wait_settled, webhook_id
from bench.procs import CpuMeter, WorkerProcess
from bench.receiver import percentile
from bench.scenarios import FAST_LIMITS, FULL, Bench

__all__ = ["fairness", "fleet"]

WORKERS = (1, 2, 3)
RATE = 100  # requests a second at the rate-limited endpoint, and its burst
CONCURRENCY = 5
IDLE_SECONDS = 3.0  # a fleet's fixed cost: each worker's CPU with nothing to deliver
SLOW = 0.2  # seconds the fairness scenario's busy endpoint takes to answer
_STAMP = b'"fileName":"t='


class _Endpoint:
    """An HTTPS endpoint in this process: answers 200 after `delay`, records arrival times,
    requests in flight and the publish stamp of each body (`bench.payload`)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.arrivals: list[float] = []
        self.waits: list[float] = []
        self.in_flight = 0
        self.most = 0
        self.port = 0
        self._arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        self.arrivals.append(now)
        start = body.find(_STAMP)
        if start >= 0:
            start += len(_STAMP)
            self.waits.append(now - float(body[start : body.find(b";", start)]))
        async with self._arrived:
            self._arrived.notify_all()
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.Response(text="ok")

    async def wait_for(self, count: int, *, within: float) -> None:
        """Wait until `count` requests arrived, or `within` seconds passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within), self._arrived:
                await self._arrived.wait_for(lambda: len(self.arrivals) >= count)


@contextlib.asynccontextmanager
async def _serving(b: Bench, *endpoints: _Endpoint) -> AsyncIterator[None]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(b.certs.cert, b.certs.key)
    runners: list[web.AppRunner] = []
    try:
        for endpoint in endpoints:
            app = web.Application()
            app.router.add_post("/hook", endpoint.handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            endpoint.port = runner.addresses[0][1]
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def _workers(b: Bench, name: str, count: int, **env: str) -> AsyncIterator[list[Any]]:
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(b.worker(f"{name}-{count}-{k}", **env))
            for k in range(count)
        ]
        yield workers


def _meter(workers: list[WorkerProcess]) -> CpuMeter:
    pids = [w.pid for w in workers]
    return CpuMeter({"worker": lambda: pids})


def worst_window(arrivals: list[float], rate: float, seconds: float = 1.0) -> float:
    """The most arrivals in any `seconds`-long window ÷ the rate x (seconds + 1) allowed."""
    times = sorted(arrivals)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > seconds:
            first += 1
        most = max(most, last - first + 1)
    return most / (rate * (seconds + 1))


@dataclass
class _Unlimited:
    """What the unlimited runs of one worker count added up to."""

    delivered: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    idle_share: float = 0.0


async def _unlimited(b: Bench, count: int, run: int, into: _Unlimited) -> None:
    """Deliveries and worker CPU over the `ok` endpoints, one account each, added to `into`.

    A warm-up batch first, not measured: each worker opens its connections (a TLS handshake
    costs ≈ 1.5 ms of worker CPU here, and each worker opens its own), loads its caches and
    takes its leases, so the figure is the steady cost per delivery, not start-up spread over
    a short run. Then the workers' CPU with nothing to do, a fleet's fixed cost."""
    events = b.sizes.throughput_events
    endpoints = len(b.receiver.ports["ok"])
    name = f"fl{count}x{run}"
    hooks = [
        Webhook(webhook_id(name, i), f"acct_{name}_{i}", b.receiver.url("ok", i))
        for i in range(endpoints)
    ]
    ids = [h.id for h in hooks]
    await insert_webhooks(b.pool, hooks)
    await b.receiver.reset()
    warm = max(endpoints, events // 10)
    async with _workers(b, "fleet", count, **FAST_LIMITS) as workers:
        await b.publisher.prefill(
            [(f"evt_{name}w_{i}", hooks[i % endpoints].account_id) for i in range(warm)]
        )
        await wait_settled(b.pool, ids, warm, b.sizes.wait)
        idle = _meter(workers)
        await asyncio.sleep(IDLE_SECONDS)
        into.idle_share = max(into.idle_share, idle.used()["worker"] / IDLE_SECONDS / count)
        meter = _meter(workers)
        started = time.perf_counter()
        await b.publisher.prefill(
            [(f"evt_{name}_{i}", hooks[i % endpoints].account_id) for i in range(events)]
        )
        seen, _ = await wait_settled(
            b.pool, ids, warm + events, b.sizes.wait - (time.perf_counter() - started)
        )
        done = seen.succeeded - warm
        into.seconds += time.perf_counter() - started
        into.cpu += meter.used()["worker"]
        into.delivered += done
    await b.after_worker()
    b.results.check(
        f"fleet: {count} workers delivered every event (run {run + 1})",
        done == events,
        f"{done} of {events}",
    )


async def _limited(b: Bench, count: int) -> tuple[float, float, int]:
    """A backlog at one endpoint limited to RATE: the worst 1-second window ÷ allowed, the
    worst window of any length ÷ allowed, and the most requests in flight."""
    endpoint = _Endpoint(delay=0.02)
    events = RATE * (8 if b.sizes.throughput_events >= FULL.throughput_events else 5)
    limits = {
        "CARGOLINT_ENDPOINT_RATE": str(RATE),
        "CARGOLINT_ENDPOINT_CONCURRENCY": str(CONCURRENCY),
    }
    async with _serving(b, endpoint):
        hook = Webhook(webhook_id(f"fl{count}r", 0), f"acct_fl{count}r", endpoint.url)
        await insert_webhooks(b.pool, [hook])
        async with _workers(b, "fleet-limited", count, **limits):
            await b.publisher.prefill(
                [(f"evt_fl{count}r_{i}", hook.account_id) for i in range(events)]
            )
            await endpoint.wait_for(events, within=b.sizes.wait)
    await b.after_worker()
    b.results.check(
        f"fleet: {count} workers sent every event to the limited endpoint",
        len(endpoint.arrivals) >= events,
        f"{len(endpoint.arrivals)} of {events}",
    )
    any_window = max(
        worst_window(endpoint.arrivals, RATE, seconds) for seconds in (0.25, 0.5, 1.0, 2.0, 4.0)
    )
    return worst_window(endpoint.arrivals, RATE), any_window, endpoint.most


async def fleet(b: Bench) -> None:
    # The unlimited runs go 1, 2, 3, 3, 2, 1 workers: this machine's speed drifts within a
    # minute, and a palindrome cancels a steady drift out of the ratio of 3 workers to 1.
    unlimited = {count: _Unlimited() for count in WORKERS}
    for run, count in enumerate([*WORKERS, *reversed(WORKERS)]):
        await _unlimited(b, count, run, unlimited[count])
    rows: dict[str, dict[str, float]] = {}
    for count in WORKERS:
        window, any_window, most = await _limited(b, count)
        u = unlimited[count]
        rows[str(count)] = {
            "deliveries_per_s": round(u.delivered / max(u.seconds, 1e-6), 1),
            "worker_cpu_us_per_delivery": round(u.cpu / max(1, u.delivered) * 1e6, 1),
            "idle_cpu_share_per_worker": round(u.idle_share, 4),
            "worst_1s_window_ratio": round(window, 3),
            "worst_window_ratio": round(any_window, 3),
            "most_in_flight": most,
        }
    b.results.extra["fleet_by_workers"] = rows
    last, first = rows[str(WORKERS[-1])], rows[str(WORKERS[0])]
    b.figures["fleet_window_ratio"] = last["worst_1s_window_ratio"]
    b.figures["fleet_cpu_ratio"] = (
        last["worker_cpu_us_per_delivery"] / first["worker_cpu_us_per_delivery"]
        if first["worker_cpu_us_per_delivery"]
        else None
    )
    ratio, cpu = b.figures["fleet_window_ratio"], b.figures["fleet_cpu_ratio"]
    # Targets of the opt-in scenarios, judged here (the table's targets are every run's).
    b.results.extra["fleet_targets_met"] = {
        "worst window within 10 % of one bucket": ratio is not None and ratio <= 1.10,
        "CPU per delivery within 10 % of one worker's": cpu is not None and cpu <= 1.10,
    }
    b.results.check(
        "fleet: concurrency at the limited endpoint within its limit",
        all(r["most_in_flight"] <= CONCURRENCY for r in rows.values()),
        orjson.dumps({n: r["most_in_flight"] for n, r in rows.items()}).decode(),
    )


async def fairness(b: Bench) -> None:
    full = b.sizes.throughput_events >= FULL.throughput_events
    backlog = 100_000 if full else 12_000
    light_events = 100 if full else 40
    busy, light = _Endpoint(delay=SLOW), _Endpoint()
    async with _serving(b, busy, light):
        hooks = [
            Webhook(webhook_id("fabusy", 0), "acct_fabusy", busy.url),
            Webhook(webhook_id("falight", 0), "acct_falight", light.url),
        ]
        await insert_webhooks(b.pool, hooks)
        async with b.worker("fairness", CARGOLINT_ENDPOINT_CONCURRENCY="10"):
            await b.publisher.prefill([(f"evt_fab_{i}", "acct_fabusy") for i in range(backlog)])
            # The whole backlog in Postgres first: the light tenant's events must not wait
            # behind it in the broker's queue, which is the consumer's speed, not fairness.
            deadline = time.monotonic() + b.sizes.wait
            while (await counts(b.pool, [hooks[0].id])).total < backlog:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            await b.publisher.paced(
                [(f"evt_fal_{i}", "acct_falight") for i in range(light_events)], rate=5.0
            )
            await light.wait_for(light_events, within=30)
            left = (await counts(b.pool, [hooks[0].id])).pending
    await b.after_worker()
    waits = sorted(light.waits)
    p99 = percentile(waits, 99)
    b.figures["fairness_p99_ms"] = None if p99 is None else p99 * 1000
    b.results.extra["fairness"] = {
        "backlog": backlog,
        "backlog_left_pending": left,
        "busy_arrivals": len(busy.arrivals),
        "light_p50_ms": None if not waits else round((percentile(waits, 50) or 0.0) * 1000, 1),
        "light_max_ms": None if not waits else round(waits[-1] * 1000, 1),
    }
    b.results.extra["fairness_targets_met"] = {
        "light tenant p99 < 1 s": p99 is not None and p99 < 1
    }
    b.results.check(
        "fairness: every light event arrived",
        len(waits) >= light_events,
        f"{len(waits)} of {light_events}",
    )
    b.results.check("fairness: the backlog was still there", left > backlog // 2, f"{left} pending")

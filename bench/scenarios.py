"""The scenarios, run in order in one invocation; each adds figures to `Results`.

The rate scenarios — limit, consume, throughput, isolation — run in `Sizes.rounds` interleaved
rounds (limit, consume, throughput, isolation, limit, …), and each figure is the sum of its rounds
(items over seconds): this machine's speed drifts by tens of percent within a minute, and a ratio
of two figures measured a minute apart measured the drift as much as the engine. Then fan-out,
latency and scale. Later scenarios use earlier figures (the paced phases run at half of
throughput's rate; isolation is judged against throughput and latency), so a failed scenario
leaves its figures None and the ones after fall back to modest defaults.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.data import (
    SECRET_KEY,
    Webhook,
    checkpoint,
    checkpoints_started,
    counts,
    insert_webhooks,
    settle,
    vacuum,
    wait_settled,
    webhook_id,
)
from bench.env import Certificates
from bench.procs import (
    CpuMeter,
    LimitClient,
    ReceiverProcess,
    WorkerProcess,
    pids_named,
    run_module,
    worker_process,
)
from bench.publisher import Publisher
from bench.recover import recover

__all__ = ["FULL", "QUICK", "ROUNDED", "SCENARIOS", "Bench", "Results", "Sizes"]

FAST_LIMITS = {"CARGOLINT_ENDPOINT_RATE": "1000000"}
FALLBACK_RATE = 100.0


@dataclass(frozen=True)
class Sizes:
    rounds: int  # of the rate scenarios (ROUNDED); their sizes below are per round
    concurrency: int
    limit_requests: int
    throughput_events: int
    fanout_events: int  # each makes 10 deliveries
    latency_seconds: float
    isolation_events: int
    scale_webhooks: int
    scale_accounts: int
    inflight_deliveries: int
    wait: float  # upper bound on any one wait for deliveries


QUICK = Sizes(
    rounds=1,
    concurrency=64,
    limit_requests=2000,
    throughput_events=1500,
    fanout_events=150,
    latency_seconds=2.0,
    isolation_events=1500,
    scale_webhooks=10_000,
    scale_accounts=1_000,
    inflight_deliveries=1_000,
    wait=40.0,
)
FULL = Sizes(
    rounds=3,
    concurrency=100,
    limit_requests=20_000,
    throughput_events=20_000,
    fanout_events=3_000,
    latency_seconds=20.0,
    isolation_events=20_000,
    scale_webhooks=100_000,
    scale_accounts=10_000,
    inflight_deliveries=10_000,
    wait=600.0,
)


@dataclass
class Results:
    """Figures by JSON key, sanity checks, extra figures and notes."""

    figures: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sanity: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.sanity.append({"check": name, "pass": bool(ok), "detail": detail})


def _us_per_item(cpu: Mapping[str, float], items: int) -> dict[str, float]:
    """CPU seconds by process group → microseconds per item."""
    return {group: round(seconds / max(1, items) * 1e6, 1) for group, seconds in cpu.items()}


@dataclass
class Tally:
    """A rate scenario's rounds added up."""

    items: int = 0
    seconds: float = 0.0
    cpu: Counter[str] = field(default_factory=Counter)  # CPU seconds by process group
    cpu_items: int = 0
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return self.items / self.seconds if self.items and self.seconds > 0 else None


@dataclass
class Bench:
    """Everything a scenario needs: sizes, the run's services and where to write logs."""

    sizes: Sizes
    certs: Certificates
    database_url: str
    amqp_url: str
    pool: asyncpg.Pool[Any]
    receiver: ReceiverProcess
    publisher: Publisher
    workdir: Path
    log_level: str
    rate: float | None = None  # overrides the paced scenarios' rate (half of throughput's)
    profile: Path | None = None  # a folder: py-spy samples each worker into <scenario>.txt
    results: Results = field(default_factory=Results)
    round: int = 0  # of the rate scenarios, from 0
    tallies: dict[str, Tally] = field(default_factory=dict)

    @property
    def last_round(self) -> bool:
        return self.round == self.sizes.rounds - 1

    def tally(
        self, name: str, items: int, seconds: float, meter: CpuMeter, cpu_items: int | None = None
    ) -> float | None:
        """Add a round of a rate scenario; return its rate over the rounds so far."""
        t = self.tallies.setdefault(name, Tally())
        t.items += items
        t.seconds += seconds
        t.cpu.update(meter.used())
        t.cpu_items += items if cpu_items is None else cpu_items
        t.rates.append(round(items / seconds, 1))
        self.results.extra[f"{name}_rps_by_round"] = t.rates
        self.results.extra[f"{name}_cpu_us_per_item"] = _us_per_item(t.cpu, t.cpu_items)
        return t.rate

    def env(self, **overrides: str) -> dict[str, str]:
        """The worker's environment: this run's services, our CA, receivers on 127.0.0.1."""
        c = str(self.sizes.concurrency)
        env = {
            "CARGOLINT_DATABASE_URL": self.database_url,
            "CARGOLINT_AMQP_URL": self.amqp_url,
            "CARGOLINT_CA_BUNDLE": str(self.certs.ca),
            "CARGOLINT_ALLOWED_NETWORKS": "127.0.0.0/8",
            "CARGOLINT_ALLOW_HTTP": "0",
            "CARGOLINT_SECRET_KEY": SECRET_KEY,
            "CARGOLINT_SHUTDOWN_GRACE": "3",
            "CARGOLINT_LOG_LEVEL": self.log_level,
            "CARGOLINT_MAX_IN_FLIGHT": c,
            "CARGOLINT_ENDPOINT_CONCURRENCY": c,
        }
        env.update(overrides)
        return env

    def worker(self, name: str, **overrides: str) -> Any:
        if self.round and name in ROUNDED:
            name = f"{name}-{self.round + 1}"
        profile = self.profile / f"{name}.txt" if self.profile is not None else None
        return worker_process(
            self.env(**overrides), self.workdir / f"worker-{name}.log", profile=profile
        )

    def cpu_meter(self, worker: WorkerProcess | None = None) -> CpuMeter:
        """Start measuring CPU of the worker, the receiver, RabbitMQ, Postgres and the machine."""
        receiver_pid = self.receiver.process.pid
        groups: dict[str, Callable[[], list[int]]] = {
            "receiver": lambda: [receiver_pid],
            "rabbitmq": lambda: pids_named("beam.smp"),
            "postgres": lambda: pids_named("postgres"),
            "harness": lambda: [os.getpid()],  # this process: the publisher and the polling
        }
        if worker is not None:
            worker_pid = worker.pid
            groups["worker"] = lambda: [worker_pid]
        return CpuMeter(groups)

    def record_cpu(self, name: str, meter: CpuMeter, items: int) -> None:
        """CPU microseconds per delivery (or request) by process group, into the extras."""
        self.results.extra[f"{name}_cpu_us_per_item"] = _us_per_item(meter.used(), items)

    async def after_worker(self) -> None:
        """Between scenarios: nothing left queued, nothing left to retry, no dead rows, no
        dirty pages."""
        await self.publisher.purge()
        await settle(self.pool)
        await vacuum(self.pool)
        await checkpoint(self.pool)

    @property
    def figures(self) -> dict[str, float | None]:
        return self.results.figures


async def topology(b: Bench) -> None:
    """Start a worker once so it declares its queues; then events can be published first."""
    started = time.perf_counter()
    async with b.worker("topology", **FAST_LIMITS):
        b.results.extra["worker_start_s"] = round(time.perf_counter() - started, 3)


async def limit(b: Bench) -> None:
    await b.receiver.reset()
    meter = b.cpu_meter()
    warmup = min(500, b.sizes.limit_requests // 4)
    result = await LimitClient.run(
        b.receiver.url("ok"),
        b.certs.ca,
        b.sizes.concurrency,
        b.sizes.limit_requests,
        warmup=warmup,
    )
    counted = await b.receiver.count()
    b.results.extra["limit_client_cpu_us_per_request"] = _mean_by_round(
        b, "limit_client_cpu_us", result["cpu_us_per_request"]
    )
    b.figures["limit_rps"] = b.tally(
        "limit", int(result["requests"]), result["seconds"], meter, result["requests"] + warmup
    )
    b.results.check("limit: no errors", result["errors"] == 0, f"{result['errors']} errors")
    b.results.check(
        "limit: receiver verified every signature",
        counted["badSignatures"] == 0,
        f"{counted['badSignatures']} bad",
    )


def _mean_by_round(b: Bench, name: str, value: float) -> float:
    """Add a client process's own figure of this round to `<name>_by_round` in the extras;
    return the mean over the rounds so far."""
    by_round = b.results.extra.setdefault(f"{name}_by_round", [])
    by_round.append(value)
    return round(statistics.fmean(by_round), 1)


async def consume(b: Bench) -> None:
    """aio-pika alone taking throughput's events, nothing else done (bench/consume.py): with the
    limit client's CPU per request, the floor of a delivery's cost on the worker's libraries."""
    n = b.sizes.throughput_events
    await b.publisher.prefill([(f"evt_cs{b.round}_{i}", "acct_cs") for i in range(n)])
    meter = b.cpu_meter()
    result = await run_module("bench.consume", f"--amqp-url={b.amqp_url}", f"--count={n}")
    b.tally("consume", n, result["seconds"], meter)
    consumed = _mean_by_round(b, "consume_cpu_us", result["cpu_us_per_message"])
    b.figures["consume_cpu_us"] = consumed
    sent = b.results.extra.get("limit_client_cpu_us_per_request")
    # One process that only consumed and only sent would spend both per delivery.
    b.figures["floor_ratio"] = sent / (sent + consumed) if sent else None


async def _drain(
    b: Bench, name: str, hooks: list[Webhook], expected: int, worker: WorkerProcess
) -> tuple[int, float] | None:
    """Wait until `expected` deliveries of `hooks` arrived and are recorded succeeded.

    Returns (deliveries, seconds from the first arrival to the moment every record read
    succeeded), None if nothing arrived.
    """
    counted = await b.receiver.wait_ok(expected, b.sizes.wait)
    settled, done_at = await wait_settled(
        b.pool, [h.id for h in hooks], expected, max(5.0, b.sizes.wait / 4)
    )
    b.results.check(
        f"{name}: every delivery arrived",
        counted["okUnique"] >= expected,
        f"{counted['okUnique']} of {expected}",
    )
    b.results.check(
        f"{name}: every delivery record succeeded",
        settled.succeeded == expected,
        f"{settled.succeeded} of {expected} ({settled.pending} pending, {settled.failed} failed)",
    )
    b.results.check(
        f"{name}: receiver verified every signature",
        counted["badSignatures"] == 0,
        f"{counted['badSignatures']} bad",
    )
    b.results.extra[f"{name}_duplicates"] = counted["arrivals"]["ok"] - counted["okUnique"]
    b.results.extra[f"{name}_tls_connections"] = counted["connections"]
    first: float | None = counted["firstOk"]
    if first is None or settled.succeeded == 0:
        return None
    return settled.succeeded, max(done_at - first, 1e-6)


async def throughput(b: Bench) -> None:
    n = b.sizes.throughput_events
    # Each round its own webhook and account, so its deliveries are counted apart.
    account = f"acct_tp{b.round}"
    hooks = [Webhook(webhook_id("tp", b.round), account, b.receiver.url("ok", 0))]
    await insert_webhooks(b.pool, hooks)
    await b.receiver.reset()
    await b.publisher.prefill([(f"evt_tp_{i}", account) for i in range(n)])
    async with b.worker("throughput", **FAST_LIMITS) as worker:
        meter = b.cpu_meter(worker)
        drained = await _drain(b, "throughput", hooks, n, worker)
        rps = b.tally("throughput", *drained, meter) if drained else None
        b.results.extra["throughput_worker_rss_mb"] = round(worker.rss_mb(), 1)
    await b.after_worker()
    b.figures["throughput_rps"] = rps
    limit_rps = b.figures.get("limit_rps")
    b.figures["throughput_ratio"] = rps / limit_rps if rps and limit_rps else None
    if limit_rps is not None and b.last_round:  # not with --only and without limit
        b.results.check("throughput: ratio > 0", bool(b.figures["throughput_ratio"]))


async def fanout(b: Bench) -> None:
    n = b.sizes.fanout_events
    hooks = [Webhook(webhook_id("fo", i), "acct_fo", b.receiver.url("ok", i)) for i in range(10)]
    await insert_webhooks(b.pool, hooks)
    await b.receiver.reset()
    await b.publisher.prefill([(f"evt_fo_{i}", "acct_fo") for i in range(n)])
    async with b.worker("fanout", **FAST_LIMITS) as worker:
        drained = await _drain(b, "fanout", hooks, n * len(hooks), worker)
    await b.after_worker()
    rps = drained[0] / drained[1] if drained else None
    b.figures["fanout_rps"] = rps
    b.results.check("fanout: deliveries/s > 0", bool(rps))


def _half_rate(b: Bench) -> float:
    if b.rate is not None:
        return b.rate
    rps = b.figures.get("throughput_rps")
    return max(10.0, rps / 2) if rps else FALLBACK_RATE


async def _paced(
    b: Bench, worker: WorkerProcess, name: str, accounts: list[str], healthy: set[str]
) -> dict[str, Any]:
    """Warm up, then publish at half of throughput's rate; return the receiver's stats.

    Events go round-robin to `accounts`; only those of `healthy` accounts are waited for.
    """
    rate = _half_rate(b)
    warm = [(f"evt_{name}_warm_{i}", accounts[i % len(accounts)]) for i in range(int(rate))]
    await b.receiver.reset()
    await b.publisher.paced(warm, rate)
    await b.receiver.wait_ok(sum(1 for _, a in warm if a in healthy), b.sizes.wait)
    await b.receiver.reset()
    count = max(50, int(rate * b.sizes.latency_seconds))
    events = [(f"evt_{name}_{i}", accounts[i % len(accounts)]) for i in range(count)]
    meter = b.cpu_meter(worker)
    checkpoints = await checkpoints_started(b.pool)
    achieved = await b.publisher.paced(events, rate)
    b.results.extra[f"{name}_rate"] = round(rate, 1)
    b.results.extra[f"{name}_achieved_rate"] = round(achieved, 1)
    want = sum(1 for _, a in events if a in healthy)
    await b.receiver.wait_ok(want, b.sizes.wait)
    b.record_cpu(name, meter, count)
    b.results.extra[f"{name}_checkpoints"] = await checkpoints_started(b.pool) - checkpoints
    stats = await b.receiver.stats()
    b.results.extra[f"{name}_tls_connections"] = stats["connections"]
    b.results.extra[f"{name}_tail_by_second"] = stats["tail"]
    b.results.check(
        f"{name}: every healthy delivery arrived",
        stats["okUnique"] >= want,
        f"{stats['okUnique']} of {want}",
    )
    return stats


def _mean_ms(metrics: dict[str, float], name: str) -> float | None:
    count = metrics.get(f"cargolint_webhooks_{name}_count")
    total = metrics.get(f"cargolint_webhooks_{name}_sum")
    return round(total / count * 1000, 2) if count and total is not None else None


async def _worker_split(b: Bench, name: str, worker: WorkerProcess) -> None:
    """Where the worker says the time went: event receipt → first attempt, and the attempt."""
    metrics = await worker.metrics()
    b.results.extra[f"{name}_worker_event_lag_ms_mean"] = _mean_ms(
        metrics, "event_to_first_attempt_seconds"
    )
    b.results.extra[f"{name}_worker_attempt_ms_mean"] = _mean_ms(
        metrics, "delivery_attempt_duration_seconds"
    )


async def _failing_work(b: Bench, name: str, worker: WorkerProcess) -> None:
    """What the broken endpoints cost the worker so far: failed attempts, parked deliveries."""
    metrics = await worker.metrics()
    failed = sum(
        value
        for key, value in metrics.items()
        if key.startswith("cargolint_webhooks_delivery_attempts_total{")
        and 'outcome="success"' not in key
    )
    b.results.extra[f"{name}_failed_attempts"] = int(failed)
    parked = metrics.get("cargolint_webhooks_deliveries_parked_total", 0.0)
    b.results.extra[f"{name}_parked"] = int(parked)


async def latency(b: Bench) -> None:
    hooks = [Webhook(webhook_id("lt", 0), "acct_lt", b.receiver.url("ok", 0))]
    await insert_webhooks(b.pool, hooks)
    async with b.worker("latency", **FAST_LIMITS) as worker:
        stats = await _paced(b, worker, "latency", ["acct_lt"], {"acct_lt"})
        await _worker_split(b, "latency", worker)
        settled, _ = await wait_settled(
            b.pool, [h.id for h in hooks], (await counts(b.pool, [hooks[0].id])).total, 10
        )
    await b.after_worker()
    lat = stats["latency"]
    for key, q in (
        ("p50", "latency_p50_ms"),
        ("p99", "latency_p99_ms"),
        ("p999", "latency_p999_ms"),
    ):
        b.figures[q] = lat[key] * 1000 if lat[key] is not None else None
    b.results.check("latency: every record succeeded", settled.pending == 0 and settled.failed == 0)
    b.results.check("latency: p99 > 0", bool(b.figures["latency_p99_ms"]))


ISOLATION_ENDPOINTS = {"ok": 16, "fail": 2, "hang": 2}


async def isolation(b: Bench) -> None:
    """10% of endpoints hang until a 2 s timeout, 10% answer 500: what do the healthy get?"""
    hooks_by_kind: dict[str, list[Webhook]] = {}
    n = 0
    for kind, endpoints in ISOLATION_ENDPOINTS.items():
        hooks_by_kind[kind] = []
        for i in range(endpoints):
            account = f"acct_is{b.round}_{kind}_{i}"  # each round its own, as in throughput
            hooks_by_kind[kind].append(
                Webhook(webhook_id("is", b.round * 1000 + n), account, b.receiver.url(kind, i))
            )
            n += 1
    every = [h for hooks in hooks_by_kind.values() for h in hooks]
    healthy = hooks_by_kind["ok"]
    accounts = [h.account_id for h in every]
    await insert_webhooks(b.pool, every)
    await b.receiver.reset()
    events = [(f"evt_is_{i}", accounts[i % len(accounts)]) for i in range(b.sizes.isolation_events)]
    healthy_accounts = {h.account_id for h in healthy}
    expected = sum(1 for _, a in events if a in healthy_accounts)
    await b.publisher.prefill(events)
    realistic = {
        **FAST_LIMITS,
        "CARGOLINT_ENDPOINT_CONCURRENCY": "10",
        "CARGOLINT_DELIVERY_TIMEOUT": "2",
    }
    stats: dict[str, Any] | None = None
    async with b.worker("isolation", **realistic) as worker:
        meter = b.cpu_meter(worker)
        drained = await _drain(b, "isolation", healthy, expected, worker)
        rps = b.tally("isolation", *drained, meter) if drained else None  # CPU: per healthy
        await _failing_work(b, "isolation", worker)
        if b.last_round:  # the paced phase once, after the last bulk round, in its worker
            stats = await _paced(b, worker, "isolation_paced", accounts, healthy_accounts)
            await _worker_split(b, "isolation", worker)
            b.results.extra["isolation_worker_rss_mb"] = round(worker.rss_mb(), 1)
    await b.after_worker()
    b.results.extra["isolation_rps"] = rps
    tp = b.figures.get("throughput_rps")
    b.figures["isolation_ratio"] = rps / tp if rps and tp else None
    if stats is None:
        return
    arrivals = stats["arrivals"]
    b.results.extra["isolation_paced_fail_arrivals"] = arrivals["fail"]
    b.results.extra["isolation_paced_hang_arrivals"] = arrivals["hang"]
    lat = stats["latency"]
    b.figures["isolation_p50_ms"] = lat["p50"] * 1000 if lat["p50"] is not None else None
    b.figures["isolation_p99_ms"] = lat["p99"] * 1000 if lat["p99"] is not None else None
    if tp is not None:
        b.results.check("isolation: ratio > 0", bool(b.figures["isolation_ratio"]))
    b.results.check(
        "isolation: failing endpoints were tried", arrivals["fail"] > 0 or arrivals["hang"] > 0
    )


async def _match_cost(b: Bench, samples: list[str]) -> float | None:
    """Microseconds per `SubscriptionCache.match` over the scale data, timed in this process."""
    try:
        from engine.settings import Settings
        from engine.worker.cache import SubscriptionCache
        from engine.worker.metrics import Metrics
    except ImportError as exc:
        b.results.notes.append(f"match cost not measured: {exc}")
        return None
    from bench.payload import EVENT_TYPE

    cache = SubscriptionCache(Settings(database_url=b.database_url), b.pool, Metrics())
    await cache.reload()
    started = time.perf_counter()
    for account in samples:
        cache.match(account, "live", EVENT_TYPE)
    return (time.perf_counter() - started) / len(samples) * 1e6


async def scale(b: Bench) -> None:
    """Many webhooks: cache load time, RSS, match cost; then RSS with deliveries held."""
    s = b.sizes
    per_account = max(1, s.scale_webhooks // s.scale_accounts)
    hang_ports = len(b.receiver.ports["hang"])
    hooks = [
        Webhook(
            webhook_id("sc", i),
            f"acct_sc_{i // per_account}",
            b.receiver.url("hang", i % hang_ports),
        )
        for i in range(s.scale_webhooks)
    ]
    started = time.perf_counter()
    await insert_webhooks(b.pool, hooks)
    b.results.extra["scale_copy_s"] = round(time.perf_counter() - started, 3)
    await b.receiver.reset()
    held = {
        **FAST_LIMITS,
        "CARGOLINT_ENDPOINT_CONCURRENCY": "10",
        "CARGOLINT_DELIVERY_TIMEOUT": "600",
    }
    async with b.worker("scale", **held) as worker:
        metrics = await worker.metrics()
        reloads = metrics.get("cargolint_webhooks_cache_reload_duration_seconds_count", 0)
        total = metrics.get("cargolint_webhooks_cache_reload_duration_seconds_sum")
        cached = metrics.get("cargolint_webhooks_cache_webhooks", 0)
        b.figures["cache_load_s"] = total / reloads if reloads and total is not None else None
        b.results.check(
            "scale: every webhook cached",
            cached >= s.scale_webhooks,
            f"{cached:.0f} of {s.scale_webhooks}",
        )
        await asyncio.sleep(1.0)
        b.figures["rss_mb"] = worker.rss_mb()
        accounts = sorted({h.account_id for h in hooks})
        samples = [accounts[(i * 7919) % len(accounts)] for i in range(100_000)]
        b.figures["match_us"] = await _match_cost(b, samples)

        events = max(1, s.inflight_deliveries // per_account)
        expected = events * per_account
        await b.publisher.prefill(
            [(f"evt_sc_{i}", accounts[i % len(accounts)]) for i in range(events)]
        )
        deadline = time.monotonic() + s.wait
        seen = await counts(b.pool, [h.id for h in hooks])
        while seen.total < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            seen = await counts(b.pool, [h.id for h in hooks])
        await asyncio.sleep(1.0)
        b.figures["rss_inflight_mb"] = worker.rss_mb()
        metrics = await worker.metrics()
        b.results.extra["scale_in_flight"] = metrics.get("cargolint_webhooks_deliveries_in_flight")
        b.results.extra["scale_queued"] = metrics.get("cargolint_webhooks_deliveries_queued")
        b.results.check(
            "scale: every held delivery recorded",
            seen.total >= expected,
            f"{seen.total} of {expected}",
        )
    await b.after_worker()
    b.results.check("scale: cache loaded", b.figures["cache_load_s"] is not None)
    b.results.check("scale: rss measured", bool(b.figures["rss_mb"]))


# Run in interleaved rounds before the others (see the module's docstring).
ROUNDED = ("limit", "consume", "throughput", "isolation")

SCENARIOS = {
    "limit": limit,
    "consume": consume,
    "throughput": throughput,
    "fanout": fanout,
    "latency": latency,
    "isolation": isolation,
    "scale": scale,
    "recover": recover,
}
# Run only when named with --only: each writes millions of rows (bench/retention.py), or runs
# several workers at once (bench/fleet.py).
OPT_IN = ("retention", "history", "fleet", "fairness")

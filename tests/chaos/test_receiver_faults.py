"""Receivers that fail: down for a while then back; a trickler and an endless body.

Deliveries to a receiver that comes back resume on the retry schedule with every attempt
recorded; a receiver that trickles or never ends its body costs one timeout or one capped
read per attempt, and the worker's memory stays flat.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.chaos.conftest import Stack
from tests.chaos.harness import publish, wait_until
from tests.chaos.receivers import BrokenPeer, CountingReceiver
from tests.chaos.run import ChaosRun, Report, scale

# Receivers down for a while, trickling or endless: long runs.
pytestmark = pytest.mark.slow

ROUNDS = 3  # the first warms up; the later ones must not grow
SCHEDULE = (1.0, 2.0, 4.0, 8.0)  # tests.chaos.run.WORKER_ENV["retry_schedule"]


async def test_receiver_down_then_back_resumes_on_schedule(
    stack: Stack, counting_receiver: CountingReceiver
) -> None:
    total = scale(300)
    run = ChaosRun(stack.pg, stack.rabbit.url, stack.ca_file, stack.logdir)
    await run.setup([counting_receiver.url])
    await counting_receiver.stop()  # down: connections to its port are refused
    await run.start_worker()
    try:
        await publish(stack.rabbit.url, run.events(total))
        # Down through the first attempt and the first two retries (at +1 s and +3 s).
        await wait_until(
            lambda: _attempted_at_least(run, total * 3),
            timeout=60,
            what="three failed attempts per delivery",
        )
        await counting_receiver.start()
        recovery = await counting_receiver.wait_delivered(total, timeout=60)
        await wait_until(
            lambda: run.all_succeeded(total), timeout=30, what="every delivery recorded"
        )
    finally:
        codes = await run.stop_workers()
    attempts = await _attempts(run)
    report = Report.one_per_event(
        "receiver-down-then-back",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=recovery,
        notes={
            "attempts": sum(len(a) for a in attempts.values()),
            "max_attempts_per_delivery": max(len(a) for a in attempts.values()),
        },
    )
    report.publish()
    assert report.lost == 0
    assert report.duplicates == 0
    assert codes == [0]
    assert await run.inconsistencies() == []
    # Every failure recorded, as a connection error; every gap at least the schedule's step.
    early = []
    for rows in attempts.values():
        assert len(rows) >= 4
        assert [r["number"] for r in rows] == list(range(1, len(rows) + 1))
        for row in rows[:-1]:
            assert row["error_class"] == "connection", row
            assert row["response_status"] is None
            assert row["error"]
        assert rows[-1]["response_status"] == 200
        for before, after in itertools.pairwise(rows):
            gap = (after["attempted_at"] - before["attempted_at"]).total_seconds()
            if gap < SCHEDULE[before["number"] - 1] * 0.98:
                early.append((before["delivery_id"], before["number"], gap))
    assert early == [], early[:5]
    # Back within the step that was pending when the receiver returned (at most 4 s here).
    assert recovery <= SCHEDULE[2] + 2.0


async def _attempted_at_least(run: ChaosRun, count: int) -> bool:
    return int(await run.fetchval("SELECT count(*) FROM delivery_attempts")) >= count


async def _attempts(run: ChaosRun) -> dict[str, list[asyncpg.Record]]:
    conn = await asyncpg.connect(run.database_url)
    try:
        rows = await conn.fetch(
            """SELECT delivery_id, number, attempted_at, response_status, error_class, error,
                      length(response_body) AS body_length, response_time_ms
               FROM delivery_attempts ORDER BY delivery_id, number"""
        )
    finally:
        await conn.close()
    grouped: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        grouped.setdefault(row["delivery_id"], []).append(row)
    return grouped


# ---------------------------------------------------------------- broken peers


@pytest.fixture
async def trickler(server_ssl: ssl.SSLContext) -> AsyncIterator[BrokenPeer]:
    peer = await BrokenPeer(server_ssl, "trickle").start()
    yield peer
    await peer.stop()


@pytest.fixture
async def endless(server_ssl: ssl.SSLContext) -> AsyncIterator[BrokenPeer]:
    peer = await BrokenPeer(server_ssl, "endless").start()
    yield peer
    await peer.stop()


async def test_trickling_and_endless_receivers_cost_a_timeout_or_a_cap_and_no_memory(
    stack: Stack, trickler: BrokenPeer, endless: BrokenPeer, counting_receiver: CountingReceiver
) -> None:
    total = scale(300)
    half = total // ROUNDS
    total = ROUNDS * half
    timeout = 2.0
    run = ChaosRun(
        stack.pg,
        stack.rabbit.url,
        stack.ca_file,
        stack.logdir,
        delivery_timeout=str(timeout),
        retry_schedule="1s",  # two attempts each
        endpoint_concurrency="50",
    )
    # Three webhooks on the same events: the two broken peers and a healthy one beside them.
    await run.setup([trickler.url, endless.url, counting_receiver.url])
    worker = await run.start_worker()
    rss_start = worker.rss_kb()
    rss_peak = rss_start
    rss_after: list[int] = []
    healthy_done = 0.0
    try:
        # Equal rounds: memory measured once each has settled.
        for round_ in range(ROUNDS):
            events = run.events(total)[round_ * half : (round_ + 1) * half]
            await publish(stack.rabbit.url, events)
            healthy_done = await counting_receiver.wait_delivered((round_ + 1) * half, 60)
            expected = 3 * (round_ + 1) * half

            async def settled(expected: int = expected) -> bool:
                nonlocal rss_peak
                rss_peak = max(rss_peak, worker.rss_kb())
                statuses = await run.statuses()
                return statuses.get("pending", 0) == 0 and sum(statuses.values()) == expected

            await wait_until(settled, timeout=120, interval=0.25, what="every delivery settled")
            rss_after.append(worker.rss_kb())
    finally:
        codes = await run.stop_workers()
    attempts = await _attempts(run)
    by_peer: dict[str, list[asyncpg.Record]] = {"trickle": [], "endless": [], "healthy": []}
    urls = await _webhook_urls(run)
    conn = await asyncpg.connect(run.database_url)
    try:
        owner = {
            r["id"]: r["webhook_id"]
            for r in await conn.fetch("SELECT id, webhook_id FROM deliveries")
        }
    finally:
        await conn.close()
    for delivery, rows in attempts.items():
        url = urls[owner[delivery]]
        key = "trickle" if url == trickler.url else "endless" if url == endless.url else "healthy"
        by_peer[key].extend(rows)

    report = Report(
        scenario="trickle-and-endless-receivers",
        events_sent=total,
        deliveries_expected=3 * total,
        delivered=counting_receiver.delivered + len({r["delivery_id"] for r in by_peer["endless"]}),
        duplicates=counting_receiver.duplicates,
        lost=total - counting_receiver.delivered,
        recovery_s=None,
        wall_s=run.wall(),
        notes={
            "healthy_all_in_s": f"{healthy_done:.1f}",
            "rss_start_mb": rss_start // 1024,
            "rss_peak_mb": rss_peak // 1024,
            "rss_after_rounds_mb": "/".join(str(r // 1024) for r in rss_after),
            "endless_bytes_sent_mb": endless.bytes_sent // 2**20,
            "trickle_bytes_sent": trickler.bytes_sent,
        },
    )
    report.publish()
    assert codes == [0]
    assert report.lost == 0
    # The trickler: every attempt ends as a timeout, at the timeout, and is retried once.
    assert len(by_peer["trickle"]) == 2 * total
    for row in by_peer["trickle"]:
        assert row["error_class"] == "timeout", row
        assert row["response_time_ms"] < (timeout + 1.5) * 1000
    # The endless body: a 2xx read only up to the 4 KiB cap, so the first attempt succeeds.
    assert len(by_peer["endless"]) == total
    for row in by_peer["endless"]:
        assert row["response_status"] == 200
        assert row["body_length"] <= 4096
    # Memory: flat while hundreds of megabytes were thrown at the worker. The first round
    # warms up pools, caches and allocator arenas; the later ones may not add to them.
    assert rss_after[-1] - rss_after[1] < 12 * 1024, rss_after
    assert await run.inconsistencies() == []


async def _webhook_urls(run: ChaosRun) -> dict[str, str]:
    conn = await asyncpg.connect(run.database_url)
    try:
        return {r["id"]: r["url"] for r in await conn.fetch("SELECT id, url FROM webhooks")}
    finally:
        await conn.close()

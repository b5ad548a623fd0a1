"""Postgres restarted in the middle of a run: cleanly (`fast`) and like a crash
(`immediate`), down for a few seconds each time.

The worker keeps nothing half-written, recovers without a restart of its own, and every
delivery ends recorded.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import Stack
from tests.chaos.harness import publish, wait_until
from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import ChaosRun, Report, StreamPublisher, queue_depths, scale

# Starts its own Postgres and restarts it mid-run.
pytestmark = pytest.mark.slow

LEASE = 3.0  # CARGOLINT_WORKER_LEASE in these runs (tests.chaos.run.WORKER_ENV)


@pytest.mark.parametrize(
    ("mode", "down_for"),
    [
        ("fast", 1.5),
        ("immediate", 1.5),
    ],
)
async def test_postgres_restart_mid_run_loses_nothing(
    stack: Stack, counting_receiver: CountingReceiver, mode: str, down_for: float
) -> None:
    throwaway_pg, throwaway_rabbit = stack.pg, stack.rabbit
    total = scale(3000)
    run = ChaosRun(throwaway_pg, throwaway_rabbit.url, stack.ca_file, stack.logdir)
    await run.setup([counting_receiver.url])
    await run.start_worker()
    publisher = StreamPublisher(throwaway_rabbit.url, run.events(total), rate=400)
    publishing = asyncio.create_task(publisher.run())
    try:
        await counting_receiver.wait_delivered(total // 3, timeout=120)
        delivered_before = counting_receiver.delivered
        await asyncio.to_thread(throwaway_pg.stop, mode)
        await asyncio.sleep(down_for)  # the outage itself: nothing to wait for but time
        delivered_while_down = counting_receiver.delivered - delivered_before
        await asyncio.to_thread(throwaway_pg.start)
        attempts_at_back = await run.fetchval("SELECT count(*) FROM delivery_attempts")
        recovery = await wait_until(
            lambda: _attempts_beyond(run, attempts_at_back),
            timeout=60,
            interval=0.05,
            what="the worker to write to the database again",
        )
        await asyncio.wait_for(publishing, timeout=120)
        await counting_receiver.wait_delivered(total, timeout=180)
        await wait_until(
            lambda: run.all_succeeded(total), timeout=60, what="every delivery recorded"
        )
        worker_alive = all(w.alive() for w in run.workers)
    finally:
        publishing.cancel()
        codes = await run.stop_workers()
    depth, dead = await queue_depths(throwaway_rabbit.url)
    report = Report.one_per_event(
        f"postgres-restart-{mode}-down-{down_for:g}s",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=recovery,
        notes={
            "down_s": down_for,
            "delivered_before": delivered_before,
            "delivered_while_down": delivered_while_down,
        },
    )
    report.publish()
    assert report.lost == 0
    assert worker_alive, "the worker exited instead of riding out the outage"
    assert await run.statuses() == {"succeeded": total}
    assert await run.inconsistencies() == []
    assert (depth, dead) == (0, 0)
    assert codes == [0], run.output()[-3000:]


async def _attempts_beyond(run: ChaosRun, count: int) -> bool:
    return int(await run.fetchval("SELECT count(*) FROM delivery_attempts")) > count


async def test_an_outage_longer_than_the_lease_does_not_resend_what_a_worker_holds(
    stack: Stack, counting_receiver: CountingReceiver
) -> None:
    """A slow receiver keeps a backlog in the worker's memory while Postgres is down for two
    leases; once it is back, nothing the worker already holds may be sent a second time.

    This found claim_due re-claiming a worker's own rows once its heartbeat had lapsed (fixed
    in b8d3ab0)."""
    total = scale(1000)
    run = ChaosRun(stack.pg, stack.rabbit.url, stack.ca_file, stack.logdir)
    await run.setup([counting_receiver.url])

    async def slow(_: str) -> int:
        await asyncio.sleep(0.1)
        return 200

    counting_receiver.decide = slow
    await run.start_worker(endpoint_concurrency="8")
    await publish(stack.rabbit.url, run.events(total))
    try:
        await wait_until(lambda: _created(run, total), timeout=60, what="every delivery created")
        await counting_receiver.wait_delivered(50, timeout=30)
        await asyncio.to_thread(stack.pg.stop, "immediate")
        await asyncio.sleep(2 * LEASE)  # the outage: longer than the worker's lease
        await asyncio.to_thread(stack.pg.start)
        back = time.monotonic()
        await counting_receiver.wait_delivered(total, timeout=120)
        await wait_until(
            lambda: run.all_succeeded(total), timeout=60, what="every delivery recorded"
        )
    finally:
        codes = await run.stop_workers()
    report = Report.one_per_event(
        "postgres-down-2x-lease",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=_since(counting_receiver, back),
        notes={"down_s": 2 * LEASE},
    )
    report.publish()
    assert report.lost == 0
    assert codes == [0]
    assert await run.inconsistencies() == []
    assert report.duplicates == 0


async def _created(run: ChaosRun, total: int) -> bool:
    return sum((await run.statuses()).values()) >= total


def _since(receiver: CountingReceiver, moment: float) -> float | None:
    first = receiver.first_ok_after(moment)
    return None if first is None else first - moment

"""RabbitMQ restarted in the middle of a 5,000-event run.

The worker must reconnect by itself, lose nothing, keep records consistent and resume
consuming within seconds of the broker being back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.chaos.harness import wait_until
from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import ChaosRun, Report, StreamPublisher, queue_depths, scale
from tests.chaos.services import ThrowawayPostgres, ThrowawayRabbit

# Starts its own RabbitMQ and restarts it mid-run.
pytestmark = pytest.mark.slow


async def test_rabbitmq_restart_mid_run_loses_nothing(
    throwaway_pg: ThrowawayPostgres,
    throwaway_rabbit: ThrowawayRabbit,
    counting_receiver: CountingReceiver,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    total = scale(5000)
    run = ChaosRun(throwaway_pg, throwaway_rabbit.url, ca_file, tmp_path)
    await run.setup([counting_receiver.url])
    await run.start_worker()
    publisher = StreamPublisher(throwaway_rabbit.url, run.events(total), rate=500)
    publishing = asyncio.create_task(publisher.run())
    try:
        # Restart once about a third of the events are in.
        await wait_until(
            lambda: _at_least(run, total // 3), timeout=120, what="a third of the events"
        )
        before = await run.events_recorded()
        await asyncio.to_thread(throwaway_rabbit.restart)
        back = time.monotonic()
        after_restart = await run.events_recorded()
        recovery = await wait_until(
            lambda: _at_least(run, after_restart + 1),
            timeout=60,
            interval=0.05,
            what="consumption to resume after the restart",
        )
        await asyncio.wait_for(publishing, timeout=120)
        await counting_receiver.wait_delivered(total, timeout=180)
        await wait_until(
            lambda: run.all_succeeded(total), timeout=60, what="every delivery recorded"
        )
    finally:
        publishing.cancel()
        codes = await run.stop_workers()
    depth, dead = await queue_depths(throwaway_rabbit.url)
    report = Report.one_per_event(
        "rabbitmq-restart",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=recovery,
        notes={
            "consumed_before_restart": before,
            "broker_start_s": f"{throwaway_rabbit.start_seconds[-1]:.1f}",
            "republished": publisher.republished,
            "first_delivery_after_back_s": _since(counting_receiver, back),
        },
    )
    report.publish()
    assert report.lost == 0
    assert await run.statuses() == {"succeeded": total}
    assert await run.inconsistencies() == []
    assert (depth, dead) == (0, 0)
    assert codes == [0], run.output()[-3000:]


async def _at_least(run: ChaosRun, count: int) -> bool:
    return await run.events_recorded() >= count


def _since(receiver: CountingReceiver, moment: float) -> str:
    first = receiver.first_ok_after(moment)
    return "none" if first is None else f"{first - moment:.2f}"

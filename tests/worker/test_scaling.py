"""No head-of-line blocking between endpoints, and several workers sharing one queue."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from engine.settings import Settings
from tests.worker.helpers import (
    Publisher,
    cached,
    dlv,
    make_account,
    make_event,
    make_webhook,
    statuses,
    wait_final,
)


@pytest.mark.slow
async def test_hanging_and_failing_endpoints_do_not_hold_back_a_healthy_one(
    start_worker: Callable[..., Any],
    make_receiver: Callable[..., Any],
    publisher: Publisher,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # Few global slots, so an endpoint that kept more than its own two would starve the rest.
    worker = await start_worker(
        endpoint_concurrency=2, max_in_flight=6, delivery_timeout=10.0, retry_schedule=(0.2,) * 5
    )
    release = asyncio.Event()

    async def hang(_: web.Request, __: bytes) -> web.Response:
        await release.wait()
        return web.Response()

    async def fail(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=500)

    hanging, failing, healthy = await make_receiver(), await make_receiver(), await make_receiver()
    hanging.handler, failing.handler = hang, fail
    account = await make_account(pool)
    hooks = {
        name: (await make_webhook(pool, wsettings, account, r.url))[0]
        for name, r in (("hanging", hanging), ("failing", failing), ("healthy", healthy))
    }
    await cached(worker, *hooks.values())
    events = [make_event(account) for _ in range(300)]
    try:
        await publisher.publish_many(events)
        healthy_ids = [dlv(hooks["healthy"], account, e) for e in events]
        await healthy.wait_for(len(events), timeout=30)
        await wait_final(pool, healthy_ids)
        # Meanwhile the hanging endpoint has had only its two slots, the rest still waiting.
        assert len(hanging.requests) == 2
        waiting = await statuses(pool, [dlv(hooks["hanging"], account, e) for e in events])
        assert sum(r["status"] == "pending" for r in waiting.values()) == len(events)
        assert worker.dispatcher.queued >= len(events) - 2
    finally:
        release.set()


@pytest.mark.slow
async def test_two_workers_on_one_queue_deliver_everything_once(
    start_worker: Callable[..., Any],
    make_receiver: Callable[..., Any],
    publisher: Publisher,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    first, second = await start_worker(), await start_worker(prefetch=50)
    receivers = [await make_receiver() for _ in range(2)]
    account = await make_account(pool)
    hooks = [(await make_webhook(pool, wsettings, account, r.url))[0] for r in receivers]
    await cached(first, *hooks)
    await cached(second, *hooks)
    events = [make_event(account) for _ in range(600)]
    await publisher.publish_many(events)
    expected = {dlv(h, account, e) for h in hooks for e in events}
    rows = await wait_final(pool, expected, timeout=60)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    received = Counter(r.headers["X-CargoLint-Delivery"] for rc in receivers for r in rc.requests)
    assert set(received) == expected
    assert max(received.values()) == 1  # none twice
    consumed = [w.metrics.events_consumed.labels("accepted")._value.get() for w in (first, second)]
    assert all(n > 0 for n in consumed), consumed  # both took a share


async def test_the_global_bound_holds_and_endpoints_take_turns_for_its_slots(
    start_worker: Callable[..., Any],
    make_receiver: Callable[..., Any],
    publisher: Publisher,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # Eight endpoints that could take 32 slots between them, and six slots: the bound holds,
    # and the endpoints waiting for a slot are served in turn, not one after another.
    worker = await start_worker(endpoint_concurrency=4, max_in_flight=6)
    in_flight = 0
    most = 0
    arrivals: list[int] = []

    def slow(index: int) -> Callable[[web.Request, bytes], Any]:
        async def answer(_: web.Request, __: bytes) -> web.Response:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            arrivals.append(index)
            try:
                await asyncio.sleep(0.02)
            finally:
                in_flight -= 1
            return web.Response()

        return answer

    receivers = [await make_receiver() for _ in range(8)]
    for index, receiver in enumerate(receivers):
        receiver.handler = slow(index)
    account = await make_account(pool)
    hooks = [(await make_webhook(pool, wsettings, account, r.url))[0] for r in receivers]
    await cached(worker, *hooks)
    events = [make_event(account) for _ in range(40)]
    await publisher.publish_many(events)
    ids = [dlv(hook, account, e) for hook in hooks for e in events]
    rows = await wait_final(pool, ids, timeout=60)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert 1 < most <= 6, most
    # Nobody waits for the others to finish: every endpoint is served early on.
    assert set(arrivals[:48]) == set(range(8)), Counter(arrivals[:48])

"""How each kind of receiver answer is classified, recorded and retried (compressed schedule)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
import trustme
from aiohttp import web
from cryptography.fernet import Fernet

from engine.delivery import Outcome, Sender
from engine.settings import Settings
from engine.worker.attempt import INTERNAL
from engine.worker.main import Worker
from tests.conftest import with_
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    make_event,
    publish_one,
    subscribed,
    wait_final,
)


async def _attempts(pool: asyncpg.Pool[Any], delivery_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM delivery_attempts WHERE delivery_id = $1 ORDER BY number", delivery_id
    )


async def test_500_then_200_is_retried_and_succeeds(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    async def flaky(_: web.Request, __: bytes) -> web.Response:
        if len(receiver.requests) == 1:
            return web.Response(status=500, text="boom")
        return web.Response(status=200, text="fine")

    receiver.handler = flaky
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
    rows = await wait_final(pool, [delivery_id])
    row = rows[delivery_id]
    assert row["status"] == "succeeded"
    assert row["attempts"] == 2
    assert row["response_status"] == 200
    assert row["error"] is None
    got = receiver.requests
    assert len(got) == 2
    # Receivers deduplicate on this header: it is the same on every retry, as is the body.
    assert {r.headers["X-CargoLint-Delivery"] for r in got} == {delivery_id}
    assert got[0].body == got[1].body
    # The retry waited at least the first scheduled delay (0.2 s).
    assert got[1].at - got[0].at >= wsettings.retry_schedule[0]
    attempts = await _attempts(pool, delivery_id)
    assert [(a["number"], a["response_status"], a["error_class"]) for a in attempts] == [
        (1, 500, "http_status"),
        (2, 200, None),
    ]
    assert attempts[0]["response_body"] == "boom"


async def test_always_500_fails_after_exactly_the_configured_attempts(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    async def broken(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=500)

    receiver.handler = broken
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    expected = len(wsettings.retry_schedule) + 1
    assert row["status"] == "failed"
    assert row["attempts"] == expected
    assert row["response_status"] == 500
    assert row["next_attempt_at"] is None
    assert row["error"] == "HTTP 500"
    assert len(await _attempts(pool, delivery_id)) == expected
    # No stray attempt after the last one.
    await asyncio.sleep(wsettings.retry_schedule[-1] + 0.3)
    assert len(receiver.requests) == expected


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [("hang", "timeout"), ("redirect", "redirect"), ("huge", None)],
)
async def test_receiver_answers(
    *,
    kind: str,
    error_class: str | None,
    start_worker: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    worker = await start_worker(retry_schedule=(0.1,))
    release = asyncio.Event()

    async def answer(request: web.Request, _: bytes) -> web.StreamResponse:
        if kind == "hang":
            await release.wait()
            return web.Response()
        if kind == "redirect":
            return web.Response(status=302, headers={"Location": receiver.url + "/elsewhere"})
        # A 10 MB body: the sender reads 4 KiB of it and hangs up.
        response = web.StreamResponse(status=200)
        response.content_length = 10 * 1024 * 1024
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _chunk in range(160):
                await response.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    receiver.handler = answer
    try:
        delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
        row = (await wait_final(pool, [delivery_id]))[delivery_id]
    finally:
        release.set()
    attempts = await _attempts(pool, delivery_id)
    if kind == "huge":
        assert row["status"] == "succeeded"
        assert len(attempts) == 1
        assert attempts[0]["response_body"] == "x" * 4096
        return
    assert row["status"] == "failed"
    assert row["attempts"] == 2
    assert [a["error_class"] for a in attempts] == [error_class, error_class]
    # Redirects are never followed.
    assert all(r.path == "/" for r in receiver.requests)
    if kind == "hang":
        assert all(a["response_time_ms"] >= 900 for a in attempts)
        assert "1s" in row["error"]
    else:
        assert row["response_status"] == 302


async def test_connection_refused(
    start_worker: Callable[..., Any],
    publisher: Publisher,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    worker = await start_worker(retry_schedule=(0.1,))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the attempt: nothing listens
    delivery_id = (
        await publish_one(worker, pool, wsettings, publisher, f"https://127.0.0.1:{port}/hook")
    ).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "failed"
    assert row["attempts"] == 2
    assert row["response_status"] is None
    attempts = await _attempts(pool, delivery_id)
    assert {a["error_class"] for a in attempts} == {"connection"}


async def test_tls_error_with_an_untrusted_certificate(
    start_worker: Callable[..., Any],
    make_receiver: Callable[..., Any],
    publisher: Publisher,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    worker = await start_worker(retry_schedule=(0.1,))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)  # a CA nobody trusts
    rogue = await make_receiver(context)
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, rogue.url)).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "failed"
    assert row["error"].startswith("TLS error")
    attempts = await _attempts(pool, delivery_id)
    assert {a["error_class"] for a in attempts} == {"tls"}
    assert rogue.requests == []


async def test_429_with_retry_after_waits_longer_than_the_schedule(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    async def limited(_: web.Request, __: bytes) -> web.Response:
        if len(receiver.requests) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    receiver.handler = limited
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "succeeded"
    first, second = receiver.requests
    # The schedule says 0.2 s; Retry-After says 1 s, and the longer wins.
    assert second.at - first.at >= 1.0
    attempts = await _attempts(pool, delivery_id)
    assert attempts[0]["response_status"] == 429
    assert orjson.loads(second.body)["deliveryId"] == delivery_id


async def test_retry_after_counts_from_the_response_not_the_request(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # A receiver that takes 0.6 s to say "retry after 1 s" must not hear from us 0.4 s later.
    async def slow_limited(_: web.Request, __: bytes) -> web.Response:
        if len(receiver.requests) == 1:
            await asyncio.sleep(0.6)
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    receiver.handler = slow_limited
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "succeeded"
    first, second = receiver.requests
    assert second.at - (first.at + 0.6) >= 1.0


@pytest.mark.slow
async def test_the_schedule_counts_from_a_timeout_not_from_the_request(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # The delivery timeout is 1 s and the schedule's first wait 0.2 s: the retry comes 0.2 s
    # after the attempt gave up, not at once because 0.2 s after its start has long passed.
    async def hangs_once(_: web.Request, __: bytes) -> web.Response:
        if len(receiver.requests) == 1:
            await asyncio.sleep(2.0)
        return web.Response(status=200)

    receiver.handler = hangs_once
    delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert row["status"] == "succeeded"
    first, second = receiver.requests
    assert second.at - first.at >= wsettings.delivery_timeout + wsettings.retry_schedule[0]


class _BrokenOnce(Sender):
    """A sender with a bug in its first attempt to `url`: it raises instead of returning an
    outcome. (Only to `url`: the worker may first take up a retry that an earlier test left.)"""

    def __init__(self, settings: Settings, url: str) -> None:
        super().__init__(settings)
        self.url = url
        self.raised = 0

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        if url == self.url and not self.raised:
            self.raised += 1
            raise RuntimeError("a bug in the attempt path")
        return await super().send(url, body, headers)


async def test_an_attempt_that_raises_is_recorded_failed_and_retried_not_held(
    wsettings: Settings,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
) -> None:
    sender = _BrokenOnce(wsettings, receiver.url)
    async with sender:
        worker = Worker(wsettings, pool=pool, sender=sender)
        await worker.start()
        try:
            delivery_id = (await publish_one(worker, pool, wsettings, publisher, receiver.url)).id
            row = (await wait_final(pool, [delivery_id]))[delivery_id]
        finally:
            await worker.stop(grace=0.5)
    assert sender.raised == 1
    assert row["status"] == "succeeded"
    attempts = await _attempts(pool, delivery_id)
    assert [(a["number"], a["error_class"]) for a in attempts] == [(1, INTERNAL), (2, None)]
    assert attempts[0]["error"] == "internal error: RuntimeError"
    assert len(receiver.requests) == 1


@pytest.mark.slow
async def test_an_endpoint_that_hangs_is_narrowed_while_slots_are_in_demand_then_widens(
    *,
    start_worker: Callable[..., Any],
    make_receiver: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # `receiver`'s first ten attempts hang until the timeout, later ones are answered after
    # 50 ms; a busy healthy endpoint beside it keeps half of the global slots in use meanwhile.
    worker = await start_worker(endpoint_concurrency=10, max_in_flight=20, retry_schedule=(0.2,))
    busy = await make_receiver()
    release = asyncio.Event()
    in_flight = 0
    at_arrival: list[int] = []  # attempts in flight as each later one arrives, itself included

    async def answer(_: web.Request, __: bytes) -> web.Response:
        nonlocal in_flight
        if len(receiver.requests) <= 10:
            await release.wait()
            return web.Response()
        in_flight += 1
        at_arrival.append(in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            in_flight -= 1
        return web.Response()

    async def slow(_: web.Request, __: bytes) -> web.Response:
        await asyncio.sleep(0.1)
        return web.Response()

    receiver.handler = answer
    busy.handler = slow
    ids: list[str] = []
    for url, count in ((receiver.url, 30), (busy.url, 300)):
        account, webhook_id, _ = await subscribed(worker, pool, wsettings, url)
        events = [make_event(account) for _ in range(count)]
        for event in events:
            await publisher.publish(event)
        ids += [dlv(webhook_id, account, e) for e in events]
    try:
        rows = await wait_final(pool, ids, timeout=30)
    finally:
        release.set()
    assert {row["status"] for row in rows.values()} == {"succeeded"}
    # The first ten went out together and timed out while the busy endpoint held its slots:
    # the hanging one was narrowed to one attempt at a time (else ten would arrive at once) ...
    assert at_arrival[:2] == [1, 1], at_arrival
    # ... and widened again as its attempts succeeded.
    assert max(at_arrival) > 1, at_arrival


async def test_a_secret_the_worker_cannot_open_fails_its_attempts_and_loses_nothing(
    *,
    start_worker: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    # The webhook's secret is sealed with a key this worker does not hold (a botched rotation).
    sealing = with_(wsettings, secret_keys=(Fernet.generate_key().decode(),))
    worker = await start_worker(
        secret_keys=(Fernet.generate_key().decode(),), retry_schedule=(0.1, 0.1)
    )
    one = await publish_one(worker, pool, sealing, publisher, receiver.url)
    delivery_id, secret = one.id, one.secret
    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    # The event still made its delivery; every attempt failed before any byte was sent.
    assert row["status"] == "failed"
    attempts = await _attempts(pool, delivery_id)
    assert [a["error_class"] for a in attempts] == [INTERNAL] * 3
    assert all("cannot open signing secret" in a["error"] for a in attempts)
    assert all(secret not in a["error"] for a in attempts)
    assert receiver.requests == []

"""Hostile receivers cost only themselves (docs/contract.md §7), against raw TLS servers.

Each server here offers far more than the client may take (an endless head, trailer or body,
tens of MiB of it) or takes for ever, and each test checks three things: the attempt's outcome
and the reason it gives; that the client hung up before the offer ran out (it stopped reading
on its own); and how much memory the process allocated meanwhile, measured with tracemalloc
(Python's allocator, where the parser keeps what it reads).

The trailer cases run twice: here on aiohttp's C parser (llhttp), and in a child pytest on its
pure-Python parser (AIOHTTP_NO_EXTENSIONS=1), which some platforms get instead.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp.http_parser
import pytest

from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.delivery.http import BODY_KEPT, HEAD_FIELDS, HEAD_LINE
from tests.delivery.conftest import (
    Conn,
    Handler,
    RawServer,
    Serve,
    settings_for,
    settle,
    wait_event,
)

BODY = b'{"event":"document.uploaded","data":{}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OFFER = 64 * 1024 * 1024  # what an endless server offers before it gives up
MEMORY = 6 * 1024 * 1024  # the most an attempt may allocate while 64 MiB are on offer
PURE_PYTHON = os.environ.get("AIOHTTP_NO_EXTENSIONS") == "1"


def headers() -> dict[str, str]:
    return request_headers(
        secret="whsec_hostile", body=BODY, event_type="document.uploaded", delivery_id="dlv_h"
    )


async def send(sender: Sender, server: RawServer) -> Outcome:
    return await sender.send(server.url + "/hook", BODY, headers())


@dataclass
class Offer:
    """What an endless server sent, and whether it ran out before the client hung up."""

    sent: int = 0
    exhausted: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)


def endless(first: bytes, filler: bytes, offer: Offer, pause: float = 0.0) -> Handler:
    """A handler: answer the request with `first`, then `filler` again and again.

    It stops when the client hangs up or after OFFER bytes.
    """

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        hangup = asyncio.create_task(conn.until_closed())
        try:
            await conn.send(first)
            offer.started.set()
            offer.sent = len(first)
            # Until the client hangs up: seen by the reader, or by the transport when a write
            # finds the connection gone.
            while not (conn.peer_closed.is_set() or conn.writer.transport.is_closing()):
                if offer.sent >= OFFER:
                    offer.exhausted = True
                    break
                await conn.send(filler)
                offer.sent += len(filler)
                # A write to a connection the client dropped need not fail: yield, so that
                # the reader sees the hang-up.
                await asyncio.sleep(pause)
            await hangup
        finally:
            hangup.cancel()

    return handler


@contextmanager
def allocations() -> Iterator[list[int]]:
    """The peak of Python allocations inside the block, above what was allocated before it."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        yield peak
        _, top = tracemalloc.get_traced_memory()
        peak.append(top - before)
    finally:
        tracemalloc.stop()


async def hostile(
    serve: Serve, sender: Sender, first: bytes, filler: bytes, pause: float = 0.0
) -> tuple[Outcome, RawServer, Offer, int]:
    offer = Offer()
    server = await serve(endless(first, filler, offer, pause))
    with allocations() as peak:
        outcome = await send(sender, server)
        await wait_event(server.conns[0].peer_closed)
    return outcome, server, offer, peak[0]


def assert_refused(outcome: Outcome, reason: str) -> None:
    assert not outcome.succeeded, outcome
    assert outcome.status is None
    assert outcome.error_class == "connection", outcome
    assert reason in (outcome.error or ""), outcome


def assert_bounded(offer: Offer, peak: int) -> None:
    assert not offer.exhausted, "the client read everything on offer"
    assert peak < MEMORY, f"{peak} bytes allocated"


LINE = b"a" * 65536
FIELDS = b"".join(b"X-Field-%05d: v\r\n" % i for i in range(3600))[:65536]


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize(
    ("first", "filler", "reason"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Endless: ",
            LINE,
            f"response headers too large: a line longer than {HEAD_LINE} bytes",
            id="endless-header-line",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n",
            FIELDS,
            f"response headers too large: more than {HEAD_FIELDS} fields",
            id="endless-header-fields",
        ),
        pytest.param(
            b"HTTP/1.1 200 ",
            LINE,
            f"response headers too large: a line longer than {HEAD_LINE} bytes",
            id="endless-status-line",
        ),
    ],
)
async def test_an_endless_head_fails_the_attempt_saying_why_and_is_read_no_further(
    serve: Serve, sender: Sender, first: bytes, filler: bytes, reason: str
) -> None:
    outcome, _, offer, peak = await hostile(serve, sender, first, filler)
    assert_refused(outcome, reason)
    assert_bounded(offer, peak)


async def test_an_enormous_head_sent_at_once_is_refused(serve: Serve, sender: Sender) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\nok"
    server = await serve(lambda conn: conn.serve(head))
    outcome = await send(sender, server)
    assert_refused(outcome, "response headers too large")
    await wait_event(server.conns[0].peer_closed)


# ---------------------------------------------------------------- trailers


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"


async def trailer_case(serve: Serve, quick: Sender, trailer: bytes, filler: bytes) -> None:
    expected = "pure-Python" if PURE_PYTHON else "C"
    parser = aiohttp.http_parser.HttpResponseParser
    assert (parser.__module__ == "aiohttp.http_parser") == PURE_PYTHON, f"not the {expected} parser"
    offer = Offer()

    async def handler(conn: Conn) -> None:
        # The head and first chunk arrive on their own; the trailer, endless, after them.
        await conn.read_request()
        await conn.send(CHUNKED)
        await asyncio.sleep(0.05)
        await conn.send(b"0\r\n" + trailer)
        offer.sent = len(CHUNKED) + 3 + len(trailer)
        while offer.sent < OFFER:
            await conn.send(filler)
            offer.sent += len(filler)
        offer.exhausted = True
        await conn.until_closed()

    server = await serve(handler)
    with allocations() as peak:
        outcome = await send(quick, server)
        await wait_event(server.conns[0].peer_closed)
    assert not outcome.succeeded, outcome
    assert outcome.error_class == "connection", outcome
    assert "response trailers too large" in (outcome.error or ""), outcome
    assert_bounded(offer, peak[0])


async def test_an_endless_trailer_line_fails_the_attempt_and_is_read_no_further(
    serve: Serve, quick: Sender
) -> None:
    await trailer_case(serve, quick, b"X-Endless: ", LINE)


async def test_endless_trailer_fields_fail_the_attempt_and_are_read_no_further(
    serve: Serve, quick: Sender
) -> None:
    await trailer_case(serve, quick, b"", FIELDS)


@pytest.mark.slow  # a second pytest process: ≈ 4 s
@pytest.mark.skipif(PURE_PYTHON, reason="this is the parent run")
def test_the_trailer_limits_hold_on_the_pure_python_parser_too() -> None:
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "trailer", __file__],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout[-3000:]


# ---------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n", id="length"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", id="until-close"),
    ],
)
async def test_an_endless_body_is_cut_at_the_cap_the_status_stands_and_it_is_never_reused(
    serve: Serve, sender: Sender, head: bytes
) -> None:
    outcome, _, offer, peak = await hostile(serve, sender, head, LINE)
    assert outcome.succeeded, outcome
    assert outcome.status == 200
    assert outcome.body == "a" * BODY_KEPT
    assert_bounded(offer, peak)
    assert offer.sent < 16 * 1024 * 1024  # read to 1 MiB, the rest left in socket buffers


async def test_an_endless_chunked_body_is_cut_at_the_cap(serve: Serve, sender: Sender) -> None:
    chunk = b"%x\r\n" % len(LINE) + LINE + b"\r\n"
    first = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
    outcome, _, offer, peak = await hostile(serve, sender, first, chunk)
    assert not outcome.succeeded
    assert (outcome.status, outcome.error_class) == (500, "http_status")
    assert outcome.body == "a" * BODY_KEPT
    assert_bounded(offer, peak)


# ---------------------------------------------------------------- bytes after the answer


SMUGGLED = b"HTTP/1.1 299 Smuggled\r\nContent-Length: 100\r\n\r\nsmuggled"


@pytest.mark.parametrize("when", ["after-the-body", "while-idle"])
async def test_an_answer_after_the_answer_is_never_taken_for_the_next_one(
    serve: Serve, sender: Sender, when: str
) -> None:
    # The body arrives after its head, with the start of a second answer right behind it:
    # aiohttp has pooled the connection by the time it reads that second head.
    idle = asyncio.Event()
    sent = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        await asyncio.sleep(0.02)  # separate segments, so separate reads
        if when == "after-the-body":
            await conn.answer(b"ok" + SMUGGLED)
        else:
            await conn.answer(b"ok")
            await wait_event(idle)
            await conn.send(SMUGGLED)
        sent.set()
        await conn.until_closed()  # and nothing more: the smuggled answer never completes

    server = await serve(handler)
    assert_ok = await send(sender, server)
    assert (assert_ok.status, assert_ok.body) == (200, "ok"), assert_ok
    idle.set()
    await wait_event(sent)
    await settle()
    following = await send(sender, server)
    assert following.succeeded, following
    assert (following.status, following.body) == (200, "ok")
    assert server.accepted == 2  # a fresh connection
    assert [len(conn.requests) for conn in server.conns] == [1, 1]
    await wait_event(server.conns[0].peer_closed)


async def test_the_start_of_a_head_after_the_answer_is_never_taken_for_the_next_one(
    serve: Serve, sender: Sender
) -> None:
    # Half a status line after the answer: aiohttp gives each request a fresh parser, so the
    # next answer is read from its own first byte and the 299 is never seen.
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(OK + b"HTTP/1.1 299 Smugg")
        while await conn.read_request() is not None:
            await conn.answer(OK)

    server = await serve(handler)
    outcomes = [await send(sender, server) for _ in range(3)]
    assert [(o.status, o.body) for o in outcomes] == [(200, "ok")] * 3, outcomes


# ---------------------------------------------------------------- time


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Slow: ", id="head"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", id="body"),
    ],
)
async def test_a_trickle_ends_at_the_total_timeout(
    serve: Serve, quick: Sender, first: bytes
) -> None:
    # One byte every 50 ms after the first line(s): the half-second timeout ends it.
    outcome, _, offer, _ = await hostile(serve, quick, first, b"a", pause=0.05)
    assert not outcome.succeeded
    assert outcome.error_class == "timeout", outcome
    assert outcome.error == "no complete response within 0.5s"
    assert offer.sent < len(first) + 20


async def test_endless_whitespace_in_a_head_is_bounded_by_the_timeout(
    serve: Serve, quick: Sender
) -> None:
    # llhttp skips whitespace before a field's value without counting it against any limit:
    # this is read until the total timeout, but nothing of it is kept.
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Blank:"
    outcome, _, offer, peak = await hostile(serve, quick, first, b" " * 65536)
    assert not outcome.succeeded
    assert outcome.error_class == "timeout", outcome
    assert peak < MEMORY, f"{peak} bytes allocated while {offer.sent} were offered"


# ---------------------------------------------------------------- others meanwhile


@pytest.fixture
async def slow_sender(ca_file: Path) -> AsyncIterator[Sender]:
    async with Sender(settings_for(ca_file, delivery_timeout=3.0)) as sender:
        yield sender


@pytest.mark.slow  # the attack lasts its whole 3 s timeout
async def test_other_endpoints_are_served_while_a_hostile_one_is(
    serve: Serve, slow_sender: Sender
) -> None:
    # The most expensive answer this client reads: endless whitespace, as fast as loopback TLS
    # carries it, until the timeout. Meanwhile another endpoint's deliveries go on.
    offer = Offer()
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Blank:"
    attacker = await serve(endless(first, b" " * 65536, offer))
    healthy = await serve(lambda conn: conn.serve(OK))
    with allocations() as peak:
        attack = asyncio.create_task(send(slow_sender, attacker))
        await wait_event(offer.started)
        outcomes = [await send(slow_sender, healthy) for _ in range(20)]
        assert not attack.done(), attack.result()
        outcome = await attack
    assert all(o.succeeded and o.body == "ok" for o in outcomes), outcomes
    assert not outcome.succeeded
    assert outcome.error_class == "timeout", outcome
    assert peak[0] < MEMORY, f"{peak[0]} bytes allocated while {offer.sent} were offered"

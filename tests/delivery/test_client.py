"""The delivery HTTP client from the outside: `Sender.send` against raw servers on 127.0.0.1.

Every server here is a hand-written asyncio server (tests/delivery/conftest.py) that sends
exactly the bytes a case needs and records exactly the bytes it received, so each test checks
both what the client did on the wire and the `Outcome` it reported. TLS unless TLS is beside
the point.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
from pathlib import Path

import pytest
import trustme

from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.delivery.client import BODY_CAP, MAX_HEAD, Client, Origin
from engine.delivery.resolver import SafeResolver
from tests.delivery.conftest import LOOPBACK, Conn, RawServer, Serve, wait_event

BODY = b'{"event":"document.uploaded","data":{"document":{"id":"doc_1"}}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
R408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def headers() -> dict[str, str]:
    return request_headers(
        secret="whsec_test_client", body=BODY, event_type="document.uploaded", delivery_id="dlv_c"
    )


async def send(sender: Sender, server: RawServer, path: str = "/hook") -> Outcome:
    return await sender.send(server.url + path, BODY, headers())


def assert_ok(outcome: Outcome, body: str = "ok") -> None:
    assert outcome.succeeded, outcome
    assert outcome.status == 200
    assert outcome.error_class is None
    assert outcome.body == body


def assert_connection_error(outcome: Outcome) -> None:
    assert not outcome.succeeded
    assert outcome.status is None
    assert outcome.error_class == "connection", outcome
    assert outcome.error


async def serve_ok(conn: Conn) -> None:
    await conn.serve(OK)


# ---------------------------------------------------------------- the request


async def test_the_request_on_the_wire_is_the_head_every_header_the_length_and_the_body(
    serve: Serve, sender: Sender
) -> None:
    server = await serve(serve_ok)
    given = {**headers(), "X-Custom": "a value; with=odd chars", "Authorization": "Bearer t0k"}

    outcome = await sender.send(server.url + "/path?q=1", BODY, given)

    assert_ok(outcome)
    [conn] = server.conns
    [request] = conn.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /path?q=1 HTTP/1.1"
    assert lines[1] == f"Host: 127.0.0.1:{server.port}".encode()
    sent = [tuple(line.split(b": ", 1)) for line in lines[2:]]
    expected = [(name.encode(), value.encode()) for name, value in given.items()]
    assert sent == [*expected, (b"Content-Length", str(len(BODY)).encode())]
    assert body == BODY
    # ... and not one byte more: the whole stream is that one request.
    assert bytes(conn.received) == request


# ---------------------------------------------------------------- connection reuse


async def test_sequential_sends_reuse_one_keep_alive_connection(
    serve: Serve, sender: Sender
) -> None:
    server = await serve(serve_ok)
    for _ in range(3):
        assert_ok(await send(sender, server))
    assert server.accepted == 1
    assert len(server.conns[0].requests) == 3


@pytest.mark.parametrize(
    ("response", "connections"),
    [
        pytest.param(OK, 1, id="http11"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            2,
            id="http11-connection-close",
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 2, id="http10"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            1,
            id="http10-keep-alive",
        ),
    ],
)
async def test_a_connection_is_reused_only_when_the_response_allows_it(
    serve: Serve, sender: Sender, response: bytes, connections: int
) -> None:
    # The server keeps every connection open and would answer a second request on it, so
    # only the client's reading of the response decides whether it is reused.
    server = await serve(lambda conn: conn.serve(response))
    assert_ok(await send(sender, server))
    assert_ok(await send(sender, server))
    assert server.accepted == connections
    assert [len(conn.requests) for conn in server.conns] == [2 // connections] * connections
    if connections == 2:
        await wait_event(server.conns[0].peer_closed)  # and the first one was closed


async def test_closed_connections_are_freed_without_waiting_for_the_cycle_collector(
    serve: Serve, sender: Sender
) -> None:
    # Each TLS connection holds buffers of about 256 KiB: left in reference cycles they piled
    # up between collections (the chaos test's worker grew by 15 MB a round).
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    server = await serve(lambda conn: conn.serve(close))
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            assert_ok(await send(sender, server))
        await asyncio.sleep(0.05)  # the last transport's connection_lost
        left = [o for o in gc.get_objects() if type(o).__name__ == "_Connection"]
    finally:
        gc.enable()
    assert server.accepted == 5
    assert left == []


async def test_a_stale_idle_connection_is_replaced_transparently(
    serve: Serve, sender: Sender
) -> None:
    closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        if await conn.read_request() is not None:
            await conn.answer(OK)
        await asyncio.sleep(0.05)  # idle a moment, then drop it: nothing else is answered
        conn.writer.close()
        closed.set()

    server = await serve(handler)
    assert_ok(await send(sender, server))
    await wait_event(closed)
    await asyncio.sleep(0.05)  # "a little later"
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    assert server.answered == 2
    assert len(server.conns[0].requests) == 1


async def test_a_request_lost_on_a_reused_connection_is_sent_once_more_on_a_new_one(
    serve: Serve, sender: Sender
) -> None:
    # The race the stale-connection retry exists for, made deterministic: the server closes
    # the kept-alive connection just as the second request arrives on it.
    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        await conn.answer(OK)
        await conn.read_request()  # and close without an answer

    server = await serve(handler)
    assert_ok(await send(sender, server))
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    assert [len(conn.requests) for conn in server.conns] == [2, 1]
    assert server.answered == 2


async def test_the_resend_after_a_lost_reused_connection_happens_only_once(
    serve: Serve, sender: Sender
) -> None:
    async def handler(conn: Conn) -> None:
        if len(server.conns) == 1:
            await conn.read_request()
            await conn.answer(OK)
        await conn.read_request()  # then close without an answer, on every connection

    server = await serve(handler)
    assert_ok(await send(sender, server))
    outcome = await send(sender, server)
    assert_connection_error(outcome)
    assert server.accepted == 2  # the reused one, then one fresh attempt, no more
    assert len(server.requests) == 3


@pytest.mark.parametrize("when", ["at-once", "after-the-request"])
async def test_a_server_that_closes_without_answering_is_a_connection_error_tried_once(
    serve: Serve, sender: Sender, when: str
) -> None:
    async def handler(conn: Conn) -> None:
        if when == "after-the-request":
            assert await conn.read_request() is not None

    server = await serve(handler)
    outcome = await send(sender, server)
    assert_connection_error(outcome)
    assert server.accepted == 1  # a fresh connection is never silently retried
    assert len(server.requests) == (1 if when == "after-the-request" else 0)


async def test_cancelling_a_send_closes_its_connection_and_the_next_send_uses_a_new_one(
    serve: Serve, sender: Sender
) -> None:
    arrived = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        arrived.set()
        await conn.until_closed()  # never answers

    server = await serve(handler)
    task = asyncio.create_task(send(sender, server))
    await wait_event(arrived)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_event(server.conns[0].peer_closed)
    assert_ok(await send(sender, server))
    assert server.accepted == 2


@pytest.mark.parametrize("when", ["with-the-response", "while-idle"])
async def test_unsolicited_bytes_on_an_idle_connection_retire_it(
    serve: Serve, sender: Sender, when: str
) -> None:
    idle = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        if when == "with-the-response":
            await conn.answer(OK + R408)
        else:
            await conn.answer(OK)
            await wait_event(idle)
            await conn.send(R408)
        await conn.until_closed()

    server = await serve(handler)
    assert_ok(await send(sender, server))
    idle.set()
    # The client drops the connection on its own: the 408 is never taken for the next answer.
    await wait_event(server.conns[0].peer_closed)
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    assert [len(conn.requests) for conn in server.conns] == [1, 1]


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    serve: Serve, ca_file: Path
) -> None:
    server = await serve(serve_ok)
    idle_timeout = 0.2
    client = Client(
        ssl_context=ssl.create_default_context(cafile=str(ca_file)),
        resolver=SafeResolver(LOOPBACK),
        allowed=LOOPBACK,
        idle_timeout=idle_timeout,
    )
    origin = Origin.of(server.url + "/hook")
    data = origin.head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    loop = asyncio.get_running_loop()
    try:
        response = await client.post(origin, data)
        idle_from = loop.time()
        assert response.status == 200
        assert response.body == b"ok"
        [conn] = server.conns
        await wait_event(conn.peer_closed)
        assert conn.peer_closed_at - idle_from >= idle_timeout * 0.9  # idle, not at once
        assert len(conn.requests) == 1
        response = await client.post(origin, data)
        assert response.status == 200
        assert server.accepted == 2
    finally:
        await client.close()


# ---------------------------------------------------------------- reading responses


async def test_a_chunked_response_is_decoded_and_its_connection_reused(
    serve: Serve, sender: Sender
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nhello,\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    server = await serve(lambda conn: conn.serve(chunked))
    assert_ok(await send(sender, server), "hello, world")
    assert_ok(await send(sender, server), "hello, world")
    assert server.accepted == 1


async def test_a_body_that_ends_when_the_server_closes(serve: Serve, sender: Sender) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await conn.send(b"the end")

    server = await serve(handler)
    assert_ok(await send(sender, server), "until the end")
    assert_ok(await send(sender, server), "until the end")
    assert server.accepted == 2


INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\n"
    b"Link: </a.css>; rel=preload\r\nLink: </b.js>; rel=preload\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
]


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
async def test_interim_responses_are_skipped_for_the_final_one(
    serve: Serve, sender: Sender, split: bool
) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            if split:
                for part in INTERIM:
                    await conn.send(part)
                    await asyncio.sleep(0.02)  # separate segments, so separate reads
            else:
                await conn.send(b"".join(INTERIM))
            conn.answered += 1

    server = await serve(handler)
    assert_ok(await send(sender, server), "final")
    assert_ok(await send(sender, server), "final")
    assert server.accepted == 1


async def test_an_interim_response_then_a_close_is_a_connection_error(
    serve: Serve, sender: Sender
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.02)  # the 100 is read on its own, then the connection ends

    server = await serve(handler)
    outcome = await send(sender, server)
    assert server.accepted == 1
    assert_connection_error(outcome)


async def test_garbage_instead_of_http_is_a_connection_error(serve: Serve, sender: Sender) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"NOT HTTP\r\n\r\n")
        await conn.until_closed()

    server = await serve(handler)
    outcome = await send(sender, server)
    assert_connection_error(outcome)
    assert "invalid HTTP response" in (outcome.error or "")
    await wait_event(server.conns[0].peer_closed)  # the client hung up on it


def big_head(size: int) -> bytes:
    lines = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"]
    total = len(lines[0]) + 4
    i = 0
    while total < size:
        line = b"X-Big-%03d: " % i + b"a" * 1000 + b"\r\n"
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines) + b"\r\nok"


async def head_case(
    serve: Serve, sender: Sender, response: bytes, piece: int
) -> tuple[Outcome, RawServer]:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        for start in range(0, len(response), piece):
            await conn.send(response[start : start + piece])
            if piece < len(response):
                await asyncio.sleep(0.01)  # separate segments, so separate reads
        await conn.until_closed()

    server = await serve(handler)
    return await send(sender, server), server


async def test_a_response_head_over_64_kib_arriving_in_pieces_is_refused(
    serve: Serve, sender: Sender
) -> None:
    outcome, server = await head_case(serve, sender, big_head(MAX_HEAD + 16384), 4096)
    assert_connection_error(outcome)
    assert f"response head larger than {MAX_HEAD} bytes" in (outcome.error or "")
    await wait_event(server.conns[0].peer_closed)  # the client hung up


async def test_a_response_head_over_64_kib_arriving_in_one_read_is_refused(
    serve: Serve, sender: Sender
) -> None:
    outcome, server = await head_case(serve, sender, big_head(MAX_HEAD + 4096), 1 << 20)
    assert_connection_error(outcome)
    assert f"response head larger than {MAX_HEAD} bytes" in (outcome.error or "")
    await wait_event(server.conns[0].peer_closed)  # the client hung up


async def test_a_response_head_just_under_64_kib_is_accepted(serve: Serve, sender: Sender) -> None:
    response = big_head(MAX_HEAD - 2048)
    assert len(response) < MAX_HEAD
    server = await serve(lambda conn: conn.serve(response))
    assert_ok(await send(sender, server))


def pattern(size: int) -> bytes:
    return bytes(97 + i % 26 for i in range(size))


async def huge_body_case(serve: Serve, sender: Sender, size: int) -> None:
    body = pattern(size)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body
    server = await serve(lambda conn: conn.serve(response))
    outcome = await send(sender, server)
    assert_ok(outcome, body[:BODY_CAP].decode())
    assert len(outcome.body) == BODY_CAP
    # The rest was not read, so the connection cannot be reused.
    await wait_event(server.conns[0].peer_closed)
    assert_ok(await send(sender, server), body[:BODY_CAP].decode())
    assert server.accepted == 2


async def test_a_long_body_is_cut_to_the_cap_and_its_connection_not_reused(
    serve: Serve, sender: Sender
) -> None:
    await huge_body_case(serve, sender, 32 * 1024)


async def test_a_1_mib_body_is_cut_to_the_cap_and_its_connection_not_reused(
    serve: Serve, sender: Sender
) -> None:
    await huge_body_case(serve, sender, 1024 * 1024)


async def test_retry_after_on_429_and_redirects_are_classified(
    serve: Serve, sender: Sender
) -> None:
    responses = [
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nslow",
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://127.0.0.1:1/elsewhere\r\n"
        b"Content-Length: 0\r\n\r\n",
    ]

    async def handler(conn: Conn) -> None:
        for response in responses:
            await conn.read_request()
            await conn.answer(response)
        await conn.until_closed()

    server = await serve(handler)
    limited = await send(sender, server)
    assert not limited.succeeded
    assert limited.status == 429
    assert limited.error_class == "http_status"
    assert limited.retry_after == 7.0
    assert limited.body == "slow"
    moved = await send(sender, server)
    assert not moved.succeeded
    assert moved.status == 301
    assert moved.error_class == "redirect"
    assert moved.retry_after is None
    assert server.accepted == 1
    assert len(server.requests) == 2  # the redirect was not followed


async def test_a_response_read_one_byte_at_a_time_is_parsed_whole(
    serve: Serve, sender: Sender
) -> None:
    response = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 12\r\nContent-Length: 4\r\n\r\nbusy"

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            for i in range(len(response)):
                await conn.send(response[i : i + 1])
                await asyncio.sleep(0.001)  # separate segments, so separate reads
            conn.answered += 1

    server = await serve(handler, tls=False)
    for _ in range(2):
        outcome = await send(sender, server)
        assert outcome.status == 429, outcome
        assert outcome.error_class == "http_status"
        assert outcome.retry_after == 12.0
        assert outcome.body == "busy"
    assert server.accepted == 1


# ---------------------------------------------------------------- timeouts


async def test_a_server_that_never_answers_times_out_and_is_hung_up_on(
    serve: Serve, quick: Sender
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.until_closed()

    server = await serve(handler)
    loop = asyncio.get_running_loop()
    outcome = await send(quick, server)
    returned = loop.time()
    assert not outcome.succeeded
    assert outcome.status is None
    assert outcome.error_class == "timeout", outcome
    assert 450 <= outcome.elapsed_ms < 1000
    [conn] = server.conns
    assert len(conn.requests) == 1
    await wait_event(conn.peer_closed, timeout=1.0)
    assert conn.peer_closed_at - returned < 0.5


async def test_a_trickling_server_times_out_at_the_total_timeout(
    serve: Serve, quick: Sender
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        reading = asyncio.create_task(conn.until_closed())
        try:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
            i = 0
            while not conn.peer_closed.is_set():
                await conn.send(head[i : i + 1] if i < len(head) else b"x")
                i += 1
                await asyncio.sleep(0.1)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    server = await serve(handler)
    outcome = await send(quick, server)
    assert outcome.error_class == "timeout", outcome
    assert 450 <= outcome.elapsed_ms < 1000
    await wait_event(server.conns[0].peer_closed, timeout=1.0)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"X-Note": "a\r\nX-Evil: 1"}, id="crlf-in-value"),
        pytest.param({"X-Note": "a\nX-Evil: 1"}, id="lf-in-value"),
        pytest.param({"X-Note": "a\rX-Evil: 1"}, id="cr-in-value"),
        pytest.param({"X-Evil: 1\r\nX-Note": "a"}, id="crlf-in-name"),
        pytest.param({"X-Note": "€"}, id="not-latin-1"),
    ],
)
async def test_a_header_that_would_inject_is_refused_before_any_byte_is_sent(
    serve: Serve, sender: Sender, bad: dict[str, str]
) -> None:
    server = await serve(serve_ok)
    fresh = await sender.send(server.url + "/hook", BODY, {**headers(), **bad})
    assert_connection_error(fresh)
    assert "invalid request" in (fresh.error or "")
    assert server.accepted == 0  # not even a connection
    # With a kept-alive connection at hand, still nothing goes out on it.
    assert_ok(await send(sender, server))
    pooled = await sender.send(server.url + "/hook", BODY, {**headers(), **bad})
    assert_connection_error(pooled)
    assert_ok(await send(sender, server))
    assert server.accepted == 1
    assert len(server.requests) == 2
    assert b"X-Evil" not in server.conns[0].received
    assert bytes(server.conns[0].received) == b"".join(server.requests)


def foreign_ssl(*names: str) -> ssl.SSLContext:
    """A server context whose certificate comes from a CA the client does not trust."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert(*names).configure_cert(context)
    return context


def misnamed_ssl(ca: trustme.CA) -> ssl.SSLContext:
    """A certificate from the trusted CA, but for another name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("example.com").configure_cert(context)
    return context


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-name"])
async def test_a_certificate_the_client_cannot_verify_is_a_tls_error(
    serve: Serve, sender: Sender, ca: trustme.CA, case: str
) -> None:
    context = foreign_ssl("127.0.0.1") if case == "unknown-ca" else misnamed_ssl(ca)
    server = await serve(serve_ok, ssl_context=context)
    outcome = await send(sender, server)
    assert not outcome.succeeded
    assert outcome.status is None
    assert outcome.error_class == "tls", outcome
    assert server.accepted == 1  # reached, then refused at the handshake
    assert server.requests == []


async def test_plain_http_works_where_tls_is_beside_the_point(serve: Serve, sender: Sender) -> None:
    server = await serve(serve_ok, tls=False)
    assert server.url.startswith("http://")
    assert_ok(await send(sender, server))
    assert_ok(await send(sender, server))
    assert server.accepted == 1


# ---------------------------------------------------------------- URLs


ORIGINS = [
    # url, then what Origin.of makes of it: tls, host, port, literal, head
    (
        "https://[::1]:8443/a b?x=ü",
        Origin(True, "::1", 8443, True, b"POST /a%20b?x=%C3%BC HTTP/1.1\r\nHost: [::1]:8443\r\n"),
    ),
    (
        "https://Exämple.com/p",
        Origin(
            True,
            "xn--exmple-cua.com",
            443,
            False,
            b"POST /p HTTP/1.1\r\nHost: xn--exmple-cua.com\r\n",
        ),
    ),
    ("http://h.com", Origin(False, "h.com", 80, False, b"POST / HTTP/1.1\r\nHost: h.com\r\n")),
    (
        "http://127.0.0.1:8080/hook?a=1&b=2",
        Origin(
            False,
            "127.0.0.1",
            8080,
            True,
            b"POST /hook?a=1&b=2 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n",
        ),
    ),
    (
        "https://EXAMPLE.com:443/x#fragment",
        Origin(True, "example.com", 443, False, b"POST /x HTTP/1.1\r\nHost: example.com\r\n"),
    ),
    (
        "http://h.com/a\r\nX-Evil: 1",  # raw line breaks never reach the head
        Origin(False, "h.com", 80, False, b"POST /aX-Evil:%201 HTTP/1.1\r\nHost: h.com\r\n"),
    ),
]


@pytest.mark.parametrize(("url", "expected"), ORIGINS)
def test_origin_of_a_url(url: str, expected: Origin) -> None:
    origin = Origin.of(url)
    assert origin == expected
    assert origin.key == (expected.tls, expected.host, expected.port)


@pytest.mark.parametrize(
    "url",
    ["ftp://h.com/", "file:///etc/passwd", "ws://h.com/", "javascript:alert(1)", "/relative"],
)
def test_origin_of_anything_but_an_absolute_http_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="absolute http"):
        Origin.of(url)

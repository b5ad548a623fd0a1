"""The delivery HTTP client from the outside: `Sender.send` against raw servers on 127.0.0.1.

Every server here is a hand-written asyncio server (tests/delivery/conftest.py) that sends
exactly the bytes a case needs and records exactly the bytes it received, so each test checks
both what the client did on the wire and the `Outcome` it reported. TLS unless TLS is beside
the point. Hostile answers (oversized, endless, smuggled, trickled) are in test_hostile.py.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.delivery.http import BODY_KEPT, HEAD_FIELDS, HEAD_LINE
from tests.delivery.conftest import Conn, RawServer, Serve, settle, wait_event

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


async def test_aiohttp_adds_no_header_of_its_own(serve: Serve, sender: Sender) -> None:
    # No User-Agent, Accept, Accept-Encoding or Content-Type of aiohttp's: Host and the length.
    server = await serve(serve_ok)
    assert_ok(await sender.send(server.url + "/bare", b"{}", {}))
    [request] = server.requests
    assert request == (
        b"POST /bare HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\n\r\n{}" % server.port
    )


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


async def test_a_connection_the_answer_closes_is_closed_on_our_side_too(
    serve: Serve, sender: Sender
) -> None:
    # Counted at the server: every connection it accepted was hung up by the client, so none
    # lingers (each TLS connection holds buffers of about 256 KiB).
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    server = await serve(lambda conn: conn.serve(close))
    for _ in range(5):
        assert_ok(await send(sender, server))
    assert server.accepted == 5
    for conn in server.conns:
        await wait_event(conn.peer_closed)
    assert [len(conn.requests) for conn in server.conns] == [1] * 5


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


async def test_a_request_lost_on_a_reused_connection_fails_and_the_next_uses_a_new_one(
    serve: Serve, sender: Sender
) -> None:
    # The server closes the kept-alive connection just as the second request arrives on it.
    # A POST is not resent by aiohttp (it may have been acted on): that attempt fails as a
    # connection error, to be retried on schedule, and the next send opens a new connection.
    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        await conn.answer(OK)
        await conn.read_request()  # and close without an answer

    server = await serve(handler)
    assert_ok(await send(sender, server))
    assert_connection_error(await send(sender, server))
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    assert [len(conn.requests) for conn in server.conns] == [2, 1]
    assert server.answered == 2


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
    sent = asyncio.Event()

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
        sent.set()
        await conn.until_closed()  # whatever comes next on this connection is not answered

    server = await serve(handler)
    assert_ok(await send(sender, server))
    idle.set()
    await wait_event(sent)
    await settle()
    # The 408 is never taken for the next answer: that goes out on a new connection.
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    assert [len(conn.requests) for conn in server.conns] == [1, 1]
    await wait_event(server.conns[0].peer_closed)


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


async def test_a_protocol_switch_is_a_failure_and_its_connection_is_not_reused(
    serve: Serve, sender: Sender
) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    switch += b"\r\n"

    async def handler(conn: Conn) -> None:
        if len(server.conns) > 1:
            await conn.serve(OK)
            return
        await conn.read_request()
        await conn.answer(switch + OK)
        await conn.until_closed()

    server = await serve(handler)
    switched = await send(sender, server)
    assert (switched.status, switched.error_class) == (101, "http_status"), switched
    assert_ok(await send(sender, server))
    assert server.accepted == 2
    await wait_event(server.conns[0].peer_closed)


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


async def test_a_head_of_more_fields_than_the_limit_is_refused_in_pieces(
    serve: Serve, sender: Sender
) -> None:
    outcome, server = await head_case(serve, sender, big_head(48 * 1024), 4096)
    assert_connection_error(outcome)
    assert f"response headers too large: more than {HEAD_FIELDS} fields" in (outcome.error or "")
    await wait_event(server.conns[0].peer_closed)  # the client hung up


async def test_a_head_of_more_fields_than_the_limit_is_refused_in_one_read(
    serve: Serve, sender: Sender
) -> None:
    outcome, server = await head_case(serve, sender, big_head(48 * 1024), 1 << 20)
    assert_connection_error(outcome)
    assert f"response headers too large: more than {HEAD_FIELDS} fields" in (outcome.error or "")
    await wait_event(server.conns[0].peer_closed)  # the client hung up


async def test_a_head_at_every_limit_at_once_is_accepted(serve: Serve, sender: Sender) -> None:
    # The longest status line, and every field at the longest line: the largest head read.
    status = b"HTTP/1.1 200 " + b"o" * (HEAD_LINE - 20) + b"\r\n"
    fields = [b"Content-Length: 2\r\n"]
    for i in range(HEAD_FIELDS - 1):
        name = b"X-Big-%03d" % i
        fields.append(name + b": " + b"a" * (HEAD_LINE - len(name)) + b"\r\n")
    response = status + b"".join(fields) + b"\r\nok"
    assert len(response) > 56 * 1024
    server = await serve(lambda conn: conn.serve(response))
    assert_ok(await send(sender, server))
    assert_ok(await send(sender, server))
    assert server.accepted == 1


def pattern(size: int) -> bytes:
    return bytes(97 + i % 26 for i in range(size))


async def test_a_long_body_is_read_to_its_end_kept_to_4_kib_and_its_connection_reused(
    serve: Serve, sender: Sender
) -> None:
    body = pattern(256 * 1024)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    server = await serve(lambda conn: conn.serve(response))
    for _ in range(2):
        outcome = await send(sender, server)
        assert_ok(outcome, body[:BODY_KEPT].decode())
    assert server.accepted == 1


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
    ],
)
async def test_a_header_that_would_inject_is_refused_before_any_byte_is_sent(
    serve: Serve, sender: Sender, bad: dict[str, str]
) -> None:
    server = await serve(serve_ok)
    assert_ok(await send(sender, server))
    refused = await sender.send(server.url + "/hook", BODY, {**headers(), **bad})
    assert_connection_error(refused)
    assert "invalid request" in (refused.error or "")
    assert_ok(await send(sender, server))
    assert len(server.requests) == 2
    assert all(b"X-Evil" not in conn.received for conn in server.conns)
    assert b"".join(bytes(conn.received) for conn in server.conns) == b"".join(server.requests)


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


async def test_the_target_is_encoded_as_the_wire_needs_it(serve: Serve, sender: Sender) -> None:
    server = await serve(serve_ok)
    assert_ok(await sender.send(server.url + "/a b/ü?x=ü&y=1#frag", BODY, headers()))
    [request] = server.requests
    assert request.startswith(b"POST /a%20b/%C3%BC?x=%C3%BC&y=1 HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "url",
    ["ftp://h.com/", "file:///etc/passwd", "ws://h.com/", "javascript:alert(1)", "/relative"],
)
async def test_anything_but_an_absolute_http_url_is_refused(sender: Sender, url: str) -> None:
    outcome = await sender.send(url, BODY, headers())
    assert_connection_error(outcome)
    assert "invalid URL" in (outcome.error or "")

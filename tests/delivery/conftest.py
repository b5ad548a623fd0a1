"""Raw HTTP servers for the delivery client's tests: each case writes exactly the bytes it needs.

No HTTP library on the server side: a `RawServer` accepts TCP (optionally TLS) connections on
127.0.0.1, counts them at accept time (before any TLS handshake), and hands each one to the
test's handler as a `Conn` that records every byte the client sent. The `ca`, `ca_file` and
`server_ssl` fixtures come from tests/conftest.py (a session-wide trustme CA).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from engine.delivery import Sender
from engine.settings import Settings

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
WAIT = 2.0  # the longest any test waits for an event it expects


class Conn:
    """The server's side of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # every byte the client sent on this connection
        self.requests: list[bytes] = []  # each complete request, head and body
        self.answered = 0  # responses this handler wrote in full
        self.peer_closed = asyncio.Event()  # a read saw EOF or a reset from the client
        self.peer_closed_at = 0.0

    def _saw_close(self) -> None:
        if not self.peer_closed.is_set():
            self.peer_closed_at = asyncio.get_running_loop().time()
            self.peer_closed.set()

    async def _read(self, n: int = 65536) -> bytes:
        try:
            data = await self.reader.read(n)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if data:
            self.received += data
        else:
            self._saw_close()
        return data

    async def read_request(self) -> bytes | None:
        """One request: the head up to the blank line, then Content-Length bytes of body.

        None when the client closes the connection instead.
        """
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            data = await self._read()
            if not data:
                return None
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = bytearray(rest)
        while len(body) < length:
            data = await self._read()
            if not data:
                return None
            body += data
        assert len(body) == length, "the client sent more than one request at once"
        request = head + b"\r\n\r\n" + bytes(body)
        self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError):
            self._saw_close()
            raise

    async def answer(self, data: bytes) -> None:
        await self.send(data)
        self.answered += 1

    async def until_closed(self) -> None:
        """Read (and record) whatever comes until the client closes the connection."""
        while await self._read():
            pass

    async def serve(self, response: bytes) -> None:
        """Answer every request on this connection with `response` until the client closes."""
        while await self.read_request() is not None:
            await self.answer(response)


Handler = Callable[[Conn], Awaitable[None]]


class RawServer:
    """A TCP (or TLS) server on 127.0.0.1 whose handler owns each connection.

    When the handler returns, the server closes that connection.
    """

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.accepted = 0  # TCP connections accepted, counted before any TLS handshake
        self.conns: list[Conn] = []  # connections handed to the handler (after TLS)
        self.errors: list[BaseException] = []  # unexpected handler failures (test bugs)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[bytes]:
        return [request for conn in self.conns for request in conn.requests]

    @property
    def answered(self) -> int:
        return sum(conn.answered for conn in self.conns)

    async def start(self) -> RawServer:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            self.accepted += 1
            reader = asyncio.StreamReader(limit=2**20)
            return asyncio.StreamReaderProtocol(reader, self._connected)

        self._server = await loop.create_server(factory, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        async with self._changed:
            self._changed.notify_all()
        try:
            await self.handler(conn)
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away mid-write: the test asserts on what it cares about
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
        writer.close()

    async def wait_conns(self, count: int) -> list[Conn]:
        """Wait until the handler has been given at least `count` connections."""
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: len(self.conns) >= count)
        return self.conns

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in self.conns:
            if not conn.writer.transport.is_closing():
                conn.writer.transport.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost
        assert not self.errors, self.errors


Serve = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def serve(server_ssl: ssl.SSLContext) -> AsyncIterator[Serve]:
    """Start raw servers: `await serve(handler)` (TLS) or `await serve(handler, tls=False)`.

    `ssl_context=` overrides the server's TLS context. All are stopped after the test.
    """
    servers: list[RawServer] = []

    async def start(
        handler: Handler, *, tls: bool = True, ssl_context: ssl.SSLContext | None = None
    ) -> RawServer:
        context = ssl_context or (server_ssl if tls else None)
        server = await RawServer(handler, context).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def settings_for(ca_file: Path, delivery_timeout: float = WAIT) -> Settings:
    """What a Sender needs to reach these servers: loopback allowed, the test CA trusted."""
    return Settings(ca_bundle=ca_file, allowed_networks=LOOPBACK, delivery_timeout=delivery_timeout)


@pytest.fixture
async def sender(ca_file: Path) -> AsyncIterator[Sender]:
    async with Sender(settings_for(ca_file)) as sender:
        yield sender


@pytest.fixture
async def quick(ca_file: Path) -> AsyncIterator[Sender]:
    """A Sender whose whole-attempt timeout is 0.5 s."""
    async with Sender(settings_for(ca_file, delivery_timeout=0.5)) as sender:
        yield sender


async def settle() -> None:
    """Let the client read what a server in this same loop has already written."""
    for _ in range(10):
        await asyncio.sleep(0.01)


async def wait_event(event: asyncio.Event, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        await event.wait()

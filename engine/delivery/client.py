"""A lean HTTP/1.1 client for webhook POSTs: keep-alive connections pooled per origin.

A webhook attempt needs little of HTTP: one POST with a body we already hold, then the status,
`Retry-After` and at most `BODY_CAP` bytes of the answer. aiohttp's general client costs about
100 µs of CPU per request here (URL objects, header multidicts, tracing, payload writers,
stream readers), most of the worker's budget for a whole delivery; this one writes the request
as one buffer and parses the answer with httptools (llhttp, as aiohttp and uvicorn do) in a
plain asyncio protocol, for about a third of that (`bench/`, README "Performance").

Safety lives in `connect`: a host that names an address is checked as written, a name is
resolved by the given resolver (which refuses blocked answers) and the very address it
returned is dialled, so nothing can rebind between check and connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import cast

import httptools
import yarl

from engine.core.urls import IPNetwork
from engine.delivery.resolver import SafeResolver, check_host

__all__ = [
    "BODY_CAP",
    "MAX_HEAD",
    "Client",
    "ConnectionLostError",
    "Origin",
    "ProtocolError",
    "Response",
]

BODY_CAP = 4096  # bytes of a response body kept; a longer body is cut off
MAX_HEAD = 64 * 1024  # a response head (status line and headers) larger than this is refused
IDLE_TIMEOUT = 15.0  # an idle keep-alive connection is closed after this long (as aiohttp)


class ProtocolError(ConnectionError):
    """The peer's answer is not HTTP/1.x we accept (malformed, oversized head, an upgrade)."""


class ConnectionLostError(ConnectionError):
    """The connection ended before a response head arrived."""


@dataclass(frozen=True, slots=True)
class Origin:
    """What a URL means on the wire: where to connect and the request's first lines."""

    tls: bool
    host: str  # as dialled and verified: IDNA-encoded, IPv6 without brackets
    port: int
    literal: bool  # the host is an IP address as written
    head: bytes  # `POST <target> HTTP/1.1` and `Host`, each with CRLF

    @classmethod
    def of(cls, url: str) -> Origin:
        u = yarl.URL(url)
        if u.scheme not in ("http", "https") or not u.raw_host or u.port is None:
            raise ValueError(f"not an absolute http(s) URL: {url[:200]}")
        host = u.raw_host
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        target = u.raw_path_qs or "/"
        head = f"POST {target} HTTP/1.1\r\nHost: {u.host_port_subcomponent}\r\n"
        return cls(u.scheme == "https", host, u.port, literal, head.encode("ascii"))

    @property
    def key(self) -> tuple[bool, str, int]:
        return (self.tls, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes  # at most BODY_CAP bytes
    retry_after: str | None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    __slots__ = (
        "_body",
        "_body_size",
        "_head_read",
        "_head_size",
        "_headers_done",
        "_parser",
        "_retry_after",
        "_status",
        "_waiter",
        "idle_since",
        "lost",
        "reusable",
        "transport",
    )

    def __init__(self) -> None:
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._head_read = 0
        self._headers_done = False
        self._status = 0
        self._retry_after: str | None = None
        self.lost = False
        self.reusable = False  # the last response ended cleanly and allows another request
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's TLS transport is one without subclassing Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (a late answer, a 408 on an idle connection): this
            # connection's framing can no longer be trusted.
            self.reusable = False
            self.close()
            return
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the response asks for a protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            refusal = exc.__context__  # what our own callback raised, if it did
            if not isinstance(refusal, ProtocolError):
                refusal = ProtocolError(f"invalid HTTP response: {exc}")
            self._fail(refusal)
            return
        if self._waiter is not None and not self._headers_done:
            # Bytes read while the head is incomplete bound what httptools buffers of one
            # endless header line; `on_headers_complete` checks the head's own size.
            self._head_read += len(data)
            if self._head_read > MAX_HEAD:
                self._fail(_head_too_large())

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done:
                # The status arrived; a body cut short (or one that ends at close) changes
                # nothing about what the receiver answered.
                self._finish()
            else:
                message = "connection closed before a response"
                self._fail(ConnectionLostError(f"{message}: {exc}" if exc else message))
        # Break the protocol ↔ parser and protocol ↔ transport cycles now: left to the cycle
        # collector, each closed TLS connection's buffers (about 256 KiB) would wait for it.
        self._parser = None
        self.transport = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers_done = False
        self._status = 0
        self._retry_after = None
        self._body = []
        self._body_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if len(name) == 11 and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._head_size > MAX_HEAD:
            raise _head_too_large()
        self._headers_done = True
        assert self._parser is not None  # noqa: S101 - called by the parser itself
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        room = BODY_CAP - self._body_size
        if room > 0:
            self._body.append(body[:room])
        self._body_size += len(body)
        if self._body_size > BODY_CAP:
            self._finish()  # enough: the rest is not read, and the connection is not reused

    def on_message_complete(self) -> None:
        if self._waiter is None:
            self.reusable = False  # the end of a message nobody waits for
            return
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers_done = False
            self._head_size = self._head_read = 0
            return
        assert self._parser is not None  # noqa: S101 - called by the parser itself
        self.reusable = self._body_size <= BODY_CAP and self._parser.should_keep_alive()
        self._finish()

    # the request

    def request(self, data: bytes) -> asyncio.Future[Response]:
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self.reusable = False
        if self.transport is None or self.lost or self.transport.is_closing():
            self._fail(ConnectionLostError("connection closed before the request"))
            return waiter
        self._head_size = self._head_read = 0
        self.on_message_begin()
        self.transport.write(data)
        return waiter

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = b"".join(self._body)
            waiter.set_result(Response(self._status, body, self._retry_after))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.reusable = False
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


def _head_too_large() -> ProtocolError:
    return ProtocolError(f"response head larger than {MAX_HEAD} bytes")


class Client:
    """Pools keep-alive connections per origin; `post` makes one request. `close()` at the end."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        resolver: SafeResolver,
        allowed: tuple[IPNetwork, ...],
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._ssl = ssl_context
        self._resolver = resolver
        self._allowed = allowed
        self._idle_timeout = idle_timeout
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def post(self, origin: Origin, data: bytes) -> Response:
        """Send one request (`origin.head` + headers + body, ready in `data`) and read the answer.

        A request on a reused connection that the peer closed before answering is sent again
        on a new one, once: a keep-alive connection may die while idle, and the receiver saw
        nothing of it.
        """
        conn = self._take(origin.key)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, data)
            except ConnectionLostError:
                if self._closed:
                    raise
                # closed while idle: try once on a fresh connection
        return await self._exchange(origin, await self._connect(origin), data)

    async def _exchange(self, origin: Origin, conn: _Connection, data: bytes) -> Response:
        self._busy.add(conn)
        try:
            response = await conn.request(data)
        except BaseException:
            conn.close()  # cancelled or failed mid-exchange: its framing is unknown
            raise
        finally:
            self._busy.discard(conn)
        if conn.reusable and not conn.lost and not self._closed:
            self._give_back(origin.key, conn)
        else:
            conn.close()
        return response

    def _take(self, key: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                return conn
        return None

    def _give_back(self, key: tuple[bool, str, int], conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        horizon = time.monotonic() - self._idle_timeout
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.lost and c.idle_since > horizon]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle and not self._closed:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._idle_timeout / 2, self._sweep)

    async def _connect(self, origin: Origin) -> _Connection:
        if origin.literal:
            check_host(origin.host, self._allowed)
            addresses = [origin.host]
        else:
            answers = await self._resolver.resolve(origin.host, origin.port, socket.AF_UNSPEC)
            addresses = [answer["host"] for answer in answers]
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    address,
                    origin.port,
                    ssl=self._ssl if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
            except ssl.SSLError:
                raise  # the peer was reached: another address would not change its certificate
            except OSError as exc:
                last = exc
                continue
            return conn
        raise last or OSError(f"{origin.host} resolved to no address")

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        await asyncio.sleep(0)  # let the transports run their connection_lost

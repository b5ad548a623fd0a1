"""Make one webhook HTTP attempt through aiohttp's client and classify its outcome.

One `ClientSession` per process (docs/contract.md §3 and §7): one `TCPConnector` with the safe
resolver (the address checked is the address dialled) and the extra CA certificates, keep-alive
connections pooled per origin, one total timeout, no redirects followed, no header of aiohttp's
own, and every answer read only to our caps:

- the head (status line, header fields and trailer fields together) through aiohttp's parser
  limits, chosen so that their product stays under 64 KiB;
- the body to 1 MiB, of which the first 4 KiB is kept; a body cut short at the cap, by the peer
  or by bytes that follow the answer changes nothing about the status the receiver gave.

A connection goes back to the pool only when its answer was read to its end, and a pooled one
that heard from its peer unasked (another answer after ours) is closed before it carries a
request: see `_Request`.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
import yarl
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from engine.core.backoff import parse_retry_after
from engine.core.urls import host_ip
from engine.delivery.resolver import BlockedAddressError, LookupFailedError, SafeResolver
from engine.settings import Settings

__all__ = ["BODY_KEPT", "BODY_READ", "HEAD_CAP", "HEAD_FIELDS", "HEAD_LINE", "Outcome", "Sender"]

HEAD_CAP = 64 * 1024  # status line, header fields and trailer fields of one answer, at most
HEAD_FIELDS = 32  # header and trailer fields together
HEAD_LINE = 1900  # the status line, and each field's name and value
# Each line also carries its separators; with 64 bytes for them the worst head still fits.
assert (HEAD_FIELDS + 1) * (HEAD_LINE + 64) <= HEAD_CAP  # noqa: S101 - a fact about constants
BODY_READ = 1024 * 1024  # bytes of a response body read at most; past that it is cut off
BODY_KEPT = 4096  # bytes of it recorded as the attempt's response body

_TARGETS_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to.

    `error_class` is one of a small fixed set: http_status, redirect, timeout, connection, tls,
    blocked_address (and the worker's own `internal`, for an attempt that raised).
    """

    succeeded: bool
    status: int | None
    elapsed_ms: int
    error_class: str | None = None
    error: str | None = None
    body: str = ""
    retry_after: float | None = None


class _UnsolicitedAnswerError(aiohttp.ClientConnectionError):
    """A pooled connection received bytes nobody asked for; it is closed, not used."""


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, refusing a pooled connection whose peer spoke out of turn.

    aiohttp returns a connection to its pool the moment an answer's body ends, and keeps
    parsing what follows on it: a second answer sent after ours (or while the connection is
    idle) would be read as the next request's answer. Such a connection reports
    `should_close`; refusing it here, before a byte of the request is written, lets the
    sender take another connection without sending anything twice.
    """

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        protocol = conn.protocol
        if protocol is not None and protocol.should_close:
            raise _UnsolicitedAnswerError("a pooled connection received an unsolicited answer")
        return await super().send(conn)


class Sender:
    """Sends webhook requests through one aiohttp session; use as an async context manager.

    Create it inside the event loop that will use it. `resolver` lets tests stand in a
    SafeResolver around a lying DNS server.
    """

    def __init__(self, settings: Settings, resolver: SafeResolver | None = None) -> None:
        self._timeout = settings.delivery_timeout
        context = ssl.create_default_context()
        if settings.ca_bundle is not None:
            context.load_verify_locations(cafile=str(settings.ca_bundle))
        self._resolver = resolver or SafeResolver.from_settings(settings)
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            use_dns_cache=False,  # the resolver keeps answers for their TTL, and no longer
            ssl=context,
            limit=0,  # the dispatcher bounds what is in flight, per endpoint and in all
            limit_per_host=0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            request_class=_Request,
            timeout=aiohttp.ClientTimeout(total=settings.delivery_timeout),
            # We sign the exact bytes and send exactly our headers: nothing added or rewritten.
            skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            max_line_size=HEAD_LINE,
            max_field_size=HEAD_LINE,
            max_headers=HEAD_FIELDS,
        )
        # URL → its parsed form and, for a host that names an address, the refusal of that
        # address: a pure function of the URL (aiohttp skips the resolver for IP literals, and
        # refuses odd spellings such as `2130706433` as invalid URLs).
        self._targets: dict[str, tuple[yarl.URL, BlockedAddressError | None]] = {}

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()
        await self._resolver.close()

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """POST `body` to `url` once and classify what happened. Never raises for peer faults."""
        started = time.monotonic()
        try:
            target = await self._target(url)
            while True:
                try:
                    return await self._exchange(target, body, headers, started)
                except _UnsolicitedAnswerError:
                    # aiohttp has closed that connection; each pass closes one, so this ends.
                    continue
        except TimeoutError:
            return Outcome(False, None, _since(started), "timeout", self._timed_out())
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error_class, message = _classify(exc)
            return Outcome(False, None, _since(started), error_class, message)

    async def _exchange(
        self, target: yarl.URL, body: bytes, headers: dict[str, str], started: float
    ) -> Outcome:
        async with self._session.post(
            target, data=body, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            retry_after = None
            if status in (429, 503):
                value = response.headers.get("Retry-After")
                retry_after = parse_retry_after(value, datetime.now(UTC))
            # Still attached while the body is on its way; aiohttp detaches it at the end.
            connection = response.connection
            try:
                kept, whole = await _read_body(response.content)
            except TimeoutError:
                refusal = _refusal_of(connection)
                if refusal is None:
                    raise
                return Outcome(False, None, _since(started), "connection", refusal)
            except aiohttp.ClientPayloadError as exc:  # only a refused trailer gets here
                message = _too_large_message(exc, "trailers")
                return Outcome(False, None, _since(started), "connection", message)
            if not whole:
                # Unread bytes remain: this connection is never reused. Aborted, not closed:
                # nothing more is read from it, nor is a TLS goodbye awaited.
                if connection is not None and connection.transport is not None:
                    connection.transport.abort()
                response.close()
        return _judge(status, _text(kept), retry_after, _since(started))

    async def _target(self, url: str) -> yarl.URL:
        known = self._targets.get(url)
        if known is None:
            target = yarl.URL(url)
            if target.scheme not in ("http", "https") or not target.raw_host:
                raise aiohttp.InvalidURL(url[:200])
            refusal = None
            host = target.raw_host
            if host is not None and host_ip(host) is not None:
                try:
                    await self._resolver.resolve(host, target.port or 0, socket.AF_UNSPEC)
                except BlockedAddressError as exc:
                    refusal = exc
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            known = self._targets[url] = (target, refusal)
        target, refusal = known
        if refusal is not None:
            raise BlockedAddressError(*refusal.args)
        return target

    def _timed_out(self) -> str:
        return f"no complete response within {self._timeout:g}s"


async def _read_body(content: aiohttp.StreamReader) -> tuple[bytes, bool]:
    """Read at most BODY_READ bytes and keep the first BODY_KEPT; True when the body ended.

    A body the peer cuts short (closed early, broken framing) ends the reading: the status
    stands. Only a trailer over the head's limits is raised, as aiohttp reports it.
    """
    kept = b""
    read = 0
    try:
        while read < BODY_READ:
            chunk = await content.read(min(BODY_READ - read, 65536))
            if not chunk:
                return kept, True
            if len(kept) < BODY_KEPT:
                kept += chunk[: BODY_KEPT - len(kept)]
            read += len(chunk)
            if content.at_eof():
                return kept, True
    except aiohttp.ClientPayloadError as exc:
        if _too_large(exc):
            raise
        return kept, False
    return kept, content.at_eof()


def _judge(status: int, text: str, retry_after: float | None, elapsed_ms: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome(True, status, elapsed_ms, body=text)
    if 300 <= status < 400:
        message = f"HTTP {status}: redirects are not followed"
        return Outcome(False, status, elapsed_ms, "redirect", message, text, retry_after)
    return Outcome(False, status, elapsed_ms, "http_status", f"HTTP {status}", text, retry_after)


def _text(body: bytes) -> str:
    # Postgres text cannot hold NUL; a receiver's body may contain one.
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _refusal_of(connection: Connection | None) -> str | None:
    """Why aiohttp's parser gave up on this connection's answer, if it did.

    With the C parser, a trailer over the limits closes the connection but leaves the body
    waiting for more; the reason is on the connection's protocol.
    """
    protocol = connection.protocol if connection is not None else None
    failure = protocol.exception() if protocol is not None else None
    if failure is not None and _too_large(failure):
        return _too_large_message(failure, "trailers")
    return None


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, BaseException) and os_error not in chain:
        chain.extend(_cause_chain(os_error))
    return chain


def _too_long(exc: BaseException) -> bool:
    """A line over the parser's limit (its copy on a connection keeps only the message)."""
    return any(
        isinstance(link, LineTooLong)
        or (isinstance(link, HttpProcessingError) and link.message.startswith("Got more than"))
        for link in _cause_chain(exc)
    )


def _too_many(exc: BaseException) -> bool:
    """More header or trailer fields than the parser's limit."""
    return any(
        isinstance(link, HttpProcessingError) and link.message.startswith("Too many")
        for link in _cause_chain(exc)
    )


def _too_large(exc: BaseException) -> bool:
    return _too_long(exc) or _too_many(exc)


def _too_large_message(exc: BaseException, part: str) -> str:
    if _too_long(exc):
        why = f"a line longer than {HEAD_LINE} bytes"
    else:
        why = f"more than {HEAD_FIELDS} fields"
    return f"response {part} too large: {why} (at most {HEAD_CAP // 1024} KiB are read)"


def _classify(exc: BaseException) -> tuple[str, str]:
    chain = _cause_chain(exc)
    for link in chain:
        if isinstance(link, BlockedAddressError):
            return "blocked_address", str(link)
    tls = [link for link in chain if isinstance(link, ssl.SSLError)]
    if tls:
        # aiohttp's own TLS errors wrap the ssl module's, which carry the reason.
        original = next((e for e in tls if not isinstance(e, aiohttp.ClientError)), tls[0])
        return "tls", f"TLS error: {_tls_reason(original)}"
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's parser refused the answer's head.
        if _too_large(exc):
            return "connection", _too_large_message(exc, "headers")
        return "connection", f"invalid HTTP response: {_short(exc.message)}"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "connection", f"invalid URL: {_short(str(exc))}"
    if isinstance(exc, ValueError):
        return "connection", f"invalid request: {_short(str(exc))}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection", "connection closed before a response"
    for link in chain:
        if isinstance(link, LookupFailedError):
            return "connection", f"connection failed: {_short(str(link))}"
        if isinstance(link, socket.gaierror):
            return "connection", f"cannot resolve the host: {_short(link.strerror or '')}"
    # The OS's words only: its messages name the address dialled, which may be a resolved one.
    errno = next((link.errno for link in chain if isinstance(link, OSError) and link.errno), None)
    reason = os.strerror(errno).lower() if errno else "could not connect"
    return "connection", f"connection failed: {reason}"


def _tls_reason(exc: ssl.SSLError) -> str:
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        return _short(f"certificate verify failed: {verify_message}")
    return _short(getattr(exc, "reason", None) or str(exc))


def _short(text: str) -> str:
    return (text or "unknown")[:500]

"""Make one webhook HTTP attempt and classify its outcome (CONTRACT §3).

One `Client` (engine/delivery/client.py): keep-alive connections pooled per origin, the safe
resolver at connection time, extra CA certificates, no redirects followed, the response body
read only up to a small cap; and here one total timeout around the whole attempt.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from engine.core.backoff import parse_retry_after
from engine.delivery.client import BODY_CAP, Client, Origin
from engine.delivery.resolver import BlockedAddressError, SafeResolver
from engine.settings import Settings

__all__ = ["BODY_CAP", "Outcome", "Sender"]

_ORIGINS_MAX = 100_000


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


class Sender:
    """Sends webhook requests through one connection pool; use as an async context manager.

    `resolver` lets tests stand in a SafeResolver around a lying DNS server.
    """

    def __init__(self, settings: Settings, resolver: SafeResolver | None = None) -> None:
        self._timeout = settings.delivery_timeout
        context = ssl.create_default_context()
        if settings.ca_bundle is not None:
            context.load_verify_locations(cafile=str(settings.ca_bundle))
        self._client = Client(
            ssl_context=context,
            resolver=resolver or SafeResolver(settings.allowed_networks),
            allowed=tuple(settings.allowed_networks),
        )
        self._origins: dict[str, Origin] = {}  # URL → its parsed form, a pure function of it

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
        await self._client.close()

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """POST `body` to `url` once and classify what happened. Never raises for peer faults."""
        started = time.monotonic()

        def elapsed() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            origin = self._origin(url)
            request = origin.head + _head_lines(headers, len(body)) + body
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(origin, request)
        except TimeoutError:
            return Outcome(
                False,
                None,
                elapsed(),
                "timeout",
                f"no complete response within {self._timeout:g}s",
            )
        except (OSError, ValueError) as exc:
            error_class, message = _classify(exc)
            return Outcome(False, None, elapsed(), error_class, message)

        status = response.status
        # Postgres text cannot hold NUL; a receiver's body may contain one.
        text = response.body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        if 200 <= status < 300:
            return Outcome(True, status, elapsed(), body=text)
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(response.retry_after, datetime.now(UTC))
        if 300 <= status < 400:
            return Outcome(
                False,
                status,
                elapsed(),
                "redirect",
                f"HTTP {status}: redirects are not followed",
                text,
                retry_after,
            )
        return Outcome(False, status, elapsed(), "http_status", f"HTTP {status}", text, retry_after)

    def _origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = Origin.of(url)
            if len(self._origins) >= _ORIGINS_MAX:
                self._origins.clear()
            self._origins[url] = origin
        return origin


def _head_lines(headers: dict[str, str], length: int) -> bytes:
    """The header lines after `Host`, the blank line included."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    # One CR and one LF per line, or a name or value would smuggle in a header of its own.
    if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
        raise ValueError("a header name or value contains a line break")
    return f"{lines}Content-Length: {length}\r\n\r\n".encode("latin-1")


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _classify(exc: BaseException) -> tuple[str, str]:
    chain = _cause_chain(exc)
    for link in chain:
        if isinstance(link, BlockedAddressError):
            return "blocked_address", str(link)
    if any(isinstance(link, ssl.SSLError) for link in chain):
        return "tls", f"TLS error: {_short(exc)}"
    if isinstance(exc, ValueError):
        return "connection", f"invalid request: {_short(exc)}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", "timed out"
    return "connection", f"connection failed: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]

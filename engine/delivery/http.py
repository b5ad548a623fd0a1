"""Make one webhook HTTP attempt and classify its outcome (CONTRACT §3).

One shared aiohttp session: connection pooling, the safe resolver, extra CA certificates, a
total timeout, no redirects, and the response body read only up to a small cap.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp

from engine.core.backoff import parse_retry_after
from engine.delivery.resolver import BlockedAddressError, SafeResolver, check_host
from engine.settings import Settings

__all__ = ["BODY_CAP", "Outcome", "Sender"]

BODY_CAP = 4096
_CHECKED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to.

    `error_class` is one of a small fixed set: http_status, redirect, timeout, connection, tls,
    blocked_address.
    """

    succeeded: bool
    status: int | None
    elapsed_ms: int
    error_class: str | None = None
    error: str | None = None
    body: str = ""
    retry_after: float | None = None


class Sender:
    """Sends webhook requests through one pooled session; use as an async context manager."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
        self._own_session = session is None
        self._session = session or self._make_session(settings)
        # URL → the refusal of its literal host, or None: a pure function of the URL.
        self._checked: dict[str, BlockedAddressError | None] = {}

    @staticmethod
    def _make_session(settings: Settings) -> aiohttp.ClientSession:
        context = ssl.create_default_context()
        if settings.ca_bundle is not None:
            context.load_verify_locations(cafile=str(settings.ca_bundle))
        connector = aiohttp.TCPConnector(
            resolver=SafeResolver(settings.allowed_networks),
            ssl=context,
            limit=settings.max_in_flight,
            limit_per_host=0,
            ttl_dns_cache=10,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=settings.delivery_timeout),
            # We sign the exact bytes; nothing may rewrite them, nor add cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

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
        if self._own_session:
            await self._session.close()

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """POST `body` to `url` once and classify what happened. Never raises for peer faults."""
        started = time.monotonic()

        def elapsed() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            self._check_host(url)
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                text = await _read_capped(response)
                status = response.status
                retry_after = None
                if status in (429, 503):
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), datetime.now(UTC)
                    )
        except TimeoutError:
            return Outcome(
                False,
                None,
                elapsed(),
                "timeout",
                f"no complete response within {self._settings.delivery_timeout:g}s",
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error_class, message = _classify(exc)
            return Outcome(False, None, elapsed(), error_class, message)

        if 200 <= status < 300:
            return Outcome(True, status, elapsed(), body=text)
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

    def _check_host(self, url: str) -> None:
        try:
            refused = self._checked[url]
        except KeyError:
            refused = None
            try:
                check_host(urlsplit(url).hostname or "", self._settings.allowed_networks)
            except BlockedAddressError as exc:
                refused = exc
            if len(self._checked) >= _CHECKED_MAX:
                self._checked.clear()
            self._checked[url] = refused
        if refused is not None:
            raise BlockedAddressError(*refused.args)


async def _read_capped(response: aiohttp.ClientResponse) -> str:
    """Read at most BODY_CAP bytes; a longer body is cut off and its connection dropped."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_CAP:
        chunk = await response.content.read(BODY_CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if not response.content.at_eof():
        response.close()
    # Postgres text cannot hold NUL; a receiver's body may contain one.
    return b"".join(chunks).decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, BaseException):
        chain.append(os_error)
    return chain


def _classify(exc: BaseException) -> tuple[str, str]:
    chain = _cause_chain(exc)
    for link in chain:
        if isinstance(link, BlockedAddressError):
            return "blocked_address", str(link)
    if any(isinstance(link, ssl.SSLError | aiohttp.ClientSSLError) for link in chain):
        return "tls", f"TLS error: {_short(exc)}"
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return "connection", f"invalid URL: {_short(exc)}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", "timed out"
    return "connection", f"connection failed: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]

"""Host-name lookups that cost only their own name: non-blocking, bounded, shared and cached.

Names are resolved by c-ares (through aiodns) on the event loop, never in a thread pool, so a
name whose DNS server never answers holds no worker thread and delays no other name's lookup.
c-ares reads `/etc/hosts` before asking DNS, as getaddrinfo does. Each lookup is bounded twice:
the caller waits at most `timeout`, and c-ares itself gives up after about as long (two tries
of a third of it each, per search-list candidate), so an abandoned query ends on its own.

One lookup per name is ever in flight: a second caller of the same name joins the first instead
of sending another query. Answers are kept for what remains of their DNS TTL (at most
`max_ttl` here; c-ares keeps its own cache of answers within their TTL, at most an hour, and
reports the TTL left), failures for a few seconds, so a dead name costs one query per
`negative_ttl`, not one per delivery.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiodns
import pycares
from aiohttp.abc import AbstractResolver

__all__ = [
    "DEFAULT_MAX_TTL",
    "DEFAULT_TIMEOUT",
    "Answer",
    "HostLookups",
    "LookupFailedError",
]

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_TTL = 300.0
NEGATIVE_TTL = 5.0
CACHE_MAX_ENTRIES = 10_000
_TRIES = 2
# c-ares doubles the wait on its second try, so two tries of timeout/3 end after about `timeout`.
_TRY_SHARE = 3.0
# A query c-ares never reports on (it should not happen) is dropped after this many timeouts,
# so the name can be asked again.
_ABANDON_AFTER = 4.0


class LookupFailedError(OSError):
    """A host name did not resolve: no such name, no address, or no answer in time.

    The message names neither a DNS server nor an address, so it may be shown to customers.
    """


@dataclass(frozen=True, slots=True)
class Answer:
    """A name's addresses as (family, address text), and how long they may be reused."""

    addresses: tuple[tuple[socket.AddressFamily, str], ...]
    ttl: float


Source = Callable[[str], Awaitable[Answer]]


@dataclass(slots=True)
class _Cached:
    expires: float
    answer: Answer | None
    error: str


class HostLookups:
    """Resolves host names to every address they have; one instance per process and loop.

    `nameservers` ("ip" or "ip:port") replaces the system's DNS servers (empty: resolv.conf);
    `inner` replaces DNS altogether with another resolver, whose answers are never cached
    (tests stand in a lying resolver this way). Call `close()` at the end.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_ttl: float = DEFAULT_MAX_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        nameservers: Sequence[str] = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        self.timeout = timeout
        self._max_ttl = max_ttl
        self._negative_ttl = min(negative_ttl, max_ttl)
        self._nameservers = list(nameservers)
        self._ask: Source = self._ask_dns if inner is None else functools.partial(_ask, inner)
        self._dns: aiodns.DNSResolver | None = None
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, asyncio.Task[Answer]] = {}
        self.queries = 0  # lookups actually sent to the source (tests count them)

    async def lookup(self, host: str) -> Answer:
        """Every address `host` resolves to; LookupFailedError if none within `timeout`."""
        name = host.lower().removesuffix(".")
        cached = self._cache.get(name)
        if cached is not None:
            if cached.expires > time.monotonic():
                if cached.answer is None:
                    raise LookupFailedError(cached.error)
                return cached.answer
            del self._cache[name]
        task = self._pending.get(name)
        if task is None:
            task = asyncio.create_task(self._fetch(name), name=f"dns lookup {name}")
            task.add_done_callback(_consume)
            self._pending[name] = task
        try:
            # Shielded: a caller that gives up leaves the lookup to those still waiting on it.
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except TimeoutError:
            raise LookupFailedError(
                f"DNS lookup of {name} did not finish within {self.timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and (caller is None or not caller.cancelling()):
                # The lookup was stopped by close(), not the caller: a failure, not a cancel.
                raise LookupFailedError(f"DNS lookup of {name} stopped: shutting down") from None
            raise

    @property
    def in_flight(self) -> int:
        """How many names are being looked up right now (each at most once)."""
        return len(self._pending)

    async def close(self) -> None:
        """Stop every lookup in flight and release the c-ares channel."""
        for task in list(self._pending.values()):
            task.cancel()
        self._pending.clear()
        if self._dns is not None:
            await self._dns.close()
            self._dns = None

    async def _fetch(self, name: str) -> Answer:
        self.queries += 1
        try:
            async with asyncio.timeout(self.timeout * _ABANDON_AFTER):
                answer = await self._ask(name)
        except (LookupFailedError, TimeoutError) as exc:
            message = str(exc) or f"DNS lookup of {name} did not finish"
            self._remember(name, _Cached(time.monotonic() + self._negative_ttl, None, message))
            raise LookupFailedError(message) from None
        finally:
            if self._pending.get(name) is asyncio.current_task():
                del self._pending[name]
        ttl = min(answer.ttl, self._max_ttl)
        if ttl > 0:
            self._remember(name, _Cached(time.monotonic() + ttl, answer, ""))
        return answer

    def _remember(self, name: str, entry: _Cached) -> None:
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[name] = entry

    async def _ask_dns(self, name: str) -> Answer:
        if self._dns is None:
            self._dns = aiodns.DNSResolver(
                nameservers=self._nameservers or None,
                loop=asyncio.get_running_loop(),
                timeout=self.timeout / _TRY_SHARE,
                tries=_TRIES,
            )
        try:
            result = await self._dns.getaddrinfo(
                name, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        except aiodns.error.DNSError as exc:
            raise LookupFailedError(_describe(name, exc)) from None
        addresses = tuple(dict.fromkeys(_address(node) for node in result.nodes))
        if not addresses:
            raise LookupFailedError(f"{name} has no address")
        ttls = [node.ttl for node in result.nodes] + [cname.ttl for cname in result.cnames]
        return Answer(addresses, float(max(0, min(ttls))))


async def _ask(resolver: AbstractResolver, name: str) -> Answer:
    try:
        results = await resolver.resolve(name, 0, socket.AF_UNSPEC)
    except OSError:
        raise LookupFailedError(f"{name} does not resolve") from None
    if not results:
        raise LookupFailedError(f"{name} has no address")
    return Answer(tuple((socket.AddressFamily(r["family"]), r["host"]) for r in results), 0.0)


def _consume(task: asyncio.Task[Answer]) -> None:
    # Every waiter may have given up already; the outcome is cached, not lost.
    if not task.cancelled():
        task.exception()


def _address(node: pycares.AddrInfoNode) -> tuple[socket.AddressFamily, str]:
    family = socket.AddressFamily(node.family)
    addr = node.addr
    text = addr[0].decode("ascii")
    if family == socket.AF_INET6 and len(addr) > 3 and addr[3]:
        text = f"{text}%{addr[3]}"  # a link-local address needs its interface to be dialled
    return family, text


def _describe(name: str, exc: aiodns.error.DNSError) -> str:
    code = exc.args[0] if exc.args else None
    if code in (aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA):
        return f"{name} does not resolve"
    if code == aiodns.error.ARES_ETIMEOUT:
        return f"DNS servers did not answer for {name}"
    reason = exc.args[1] if len(exc.args) > 1 else "failed"
    return f"DNS lookup of {name} failed: {reason}"

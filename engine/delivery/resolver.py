"""A resolver that refuses private addresses at connection time (DNS rebinding included)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from engine.core.urls import IPNetwork, blocked_reason, host_ip

__all__ = ["BlockedAddressError", "SafeResolver", "check_host"]


class BlockedAddressError(OSError):
    """The host is, or resolved to, an address deliveries may not reach.

    An OSError, so aiohttp wraps it as a connection error and our classifier finds it as the
    cause.
    """


def check_host(host: str, allowed: Iterable[IPNetwork]) -> None:
    """Refuse a host that literally names a blocked address (aiohttp skips the resolver then)."""
    ip = host_ip(host)
    if ip is not None and (reason := blocked_reason(ip, allowed)):
        raise BlockedAddressError(f"address not allowed: {reason}")


class SafeResolver(AbstractResolver):
    """Resolve with getaddrinfo, then refuse the answer if any address is blocked."""

    def __init__(
        self, allowed: Iterable[IPNetwork] = (), inner: AbstractResolver | None = None
    ) -> None:
        # `inner` lets tests stand in a resolver that lies, as a rebinding DNS server would.
        self._inner = inner or ThreadedResolver()
        self._allowed = tuple(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        check_host(host, self._allowed)
        results = await self._inner.resolve(host, port, family)
        for result in results:
            ip = host_ip(result["host"])
            if ip is None:
                raise BlockedAddressError(
                    f"address not allowed: {host} resolved to {result['host']}"
                )
            if reason := blocked_reason(ip, self._allowed):
                raise BlockedAddressError(f"address not allowed: {host} resolved to {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()

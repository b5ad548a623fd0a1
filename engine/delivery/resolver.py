"""A resolver that refuses private addresses at connection time (DNS rebinding included).

aiohttp's connector dials exactly the addresses `SafeResolver.resolve` returns, and it returns
only addresses it has checked: what is checked is what is dialled. Refusals say what kind of
address a name resolves to, never which address, so they may be shown to customers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

from aiohttp.abc import AbstractResolver, ResolveResult

from engine.core.urls import IPNetwork, blocked_reason, host_ip
from engine.delivery.dns import (
    DEFAULT_MAX_TTL,
    DEFAULT_TIMEOUT,
    Answer,
    HostLookups,
    LookupFailedError,
)
from engine.settings import Settings

__all__ = [
    "BlockedAddressError",
    "LookupFailedError",
    "SafeResolver",
    "allowed_addresses",
    "check_host",
]

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class BlockedAddressError(OSError):
    """The host is, or resolved to, an address deliveries may not reach.

    An OSError, so aiohttp wraps it as a connection error and our classifier finds it as the
    cause.
    """


def check_host(host: str, allowed: Iterable[IPNetwork]) -> None:
    """Refuse a host that literally names a blocked address (aiohttp skips the resolver then)."""
    ip = host_ip(host.removesuffix("."))
    if ip is not None and (reason := blocked_reason(ip, allowed)):
        raise BlockedAddressError(f"address not allowed: the host is {reason}")


def allowed_addresses(
    host: str, answer: Answer, allowed: Iterable[IPNetwork]
) -> list[tuple[socket.AddressFamily, str]]:
    """The addresses of `answer` deliveries may reach; BlockedAddressError when there are none.

    The refusal names the kind of the first blocked address, never the address.
    """
    allowed = tuple(allowed)
    usable: list[tuple[socket.AddressFamily, str]] = []
    refusal = f"address not allowed: {host} resolves to something that is not an address"
    for kind, address in answer.addresses:
        ip = host_ip(address)
        reason = None if ip is None else blocked_reason(ip, allowed)
        if ip is not None and reason is None:
            usable.append((kind, address))
        elif reason is not None and not usable:
            refusal = f"address not allowed: {host} resolves to {reason}"
    if not usable:
        raise BlockedAddressError(refusal)
    return usable


class SafeResolver(AbstractResolver):
    """Resolve through `HostLookups` (c-ares) and keep only the addresses deliveries may reach.

    `inner` lets tests stand in a resolver that lies, as a rebinding DNS server would;
    `nameservers` lets them point c-ares at a DNS server of their own.
    """

    def __init__(
        self,
        allowed: Iterable[IPNetwork] = (),
        inner: AbstractResolver | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_ttl: float = DEFAULT_MAX_TTL,
        nameservers: Sequence[str] = (),
    ) -> None:
        self._allowed = tuple(allowed)
        self.lookups = HostLookups(
            timeout=timeout, max_ttl=max_ttl, nameservers=nameservers, inner=inner
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, inner: AbstractResolver | None = None
    ) -> SafeResolver:
        """The resolver `settings` describe: allowed networks, DNS timeout and servers."""
        return cls(
            settings.allowed_networks,
            inner,
            timeout=settings.dns_timeout,
            nameservers=settings.dns_servers,
        )

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        check_host(host, self._allowed)
        literal = host_ip(host.removesuffix("."))
        if literal is not None:
            # An odd spelling of an address (`0x7f.1`): dialled as the address it names, as
            # getaddrinfo would, with no DNS query.
            kind = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            answer = Answer(((kind, str(literal)),), 0.0)
        else:
            answer = await self.lookups.lookup(host)
        # Only allowed addresses are handed to the connector, so only they are dialled; a name
        # with none is refused. (c-ares answers `localhost` with ::1 beside 127.0.0.1: where
        # only 127.0.0.0/8 is allowed, 127.0.0.1 is dialled.)
        usable = allowed_addresses(host, answer, self._allowed)
        results = [
            ResolveResult(
                hostname=host, host=address, port=port, family=kind, proto=0, flags=_NUMERIC
            )
            for kind, address in usable
            if family in (socket.AF_UNSPEC, kind)
        ]
        if not results:
            version = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise LookupFailedError(f"{host} has no {version} address")
        return results

    async def close(self) -> None:
        await self.lookups.close()

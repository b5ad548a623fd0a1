"""Is a webhook URL's host an address deliveries may reach? Checked at create and update.

An IP literal (in any spelling a resolver accepts) is judged directly; a name is resolved with
a short timeout and refused if any of its addresses is blocked. A name that does not resolve
is accepted: DNS may change, and the delivery's connection-time check is the real guard.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from engine.api.errors import ApiError, bad_request
from engine.core.urls import IPNetwork, blocked_reason, host_ip

__all__ = ["RESOLVE_TIMEOUT", "check_destination"]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 2.0


def _not_allowed(reason: str) -> ApiError:
    return bad_request("url_not_allowed", f"url is not allowed: {reason}", "url")


async def check_destination(url: str, allowed: Iterable[IPNetwork]) -> None:
    """Raise ApiError(400, url_not_allowed) if the URL's host is or resolves to a blocked address.

    `url` has passed `engine.core.urls.check_url` already.
    """
    allowed = tuple(allowed)
    parts = urlsplit(url)
    # A fully qualified name's final dot leads to the same place: `127.0.0.1.` and `localhost.`
    # are judged as `127.0.0.1` and `localhost` (as browsers' URL parsers read them).
    host = (parts.hostname or "").removesuffix(".")
    literal = host_ip(host)
    if literal is not None:
        if reason := blocked_reason(literal, allowed):
            raise _not_allowed(reason)
        return
    # `*.localhost` is loopback by definition (RFC 6761), whatever the resolver says today.
    loopback = ipaddress.ip_address("127.0.0.1")
    if host.lower().endswith(".localhost") and (reason := blocked_reason(loopback, allowed)):
        raise _not_allowed(f"{host} is a loopback name: {reason}")
    try:
        valid = bool(host.encode("idna"))
    except UnicodeError:
        valid = False
    if not valid:
        raise bad_request("invalid_url", "url host is not a valid host name", "url")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError) as exc:
        log.info("webhook host did not resolve; accepted", extra={"host": host, "error": exc})
        return
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if reason := blocked_reason(ip, allowed):
            raise _not_allowed(f"{host} resolves to {reason}")

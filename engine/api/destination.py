"""Is a webhook URL's host an address deliveries may reach? Checked at create and update.

An IP literal (in any spelling a resolver accepts) is judged directly; a name is resolved
through the same non-blocking, cached lookups the worker uses (engine/delivery/dns.py) and
refused when none of its addresses may be reached (deliveries dial only the allowed ones). A
name that does not resolve in time is accepted: DNS may change, and the delivery's
connection-time check is the real guard. Refusals say what kind of address, never which.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from engine.api.errors import ApiError, bad_request
from engine.core.urls import IPNetwork, blocked_reason, host_ip
from engine.delivery.dns import HostLookups, LookupFailedError
from engine.delivery.resolver import BlockedAddressError, allowed_addresses

__all__ = ["check_destination"]

log = logging.getLogger(__name__)


def _not_allowed(reason: str) -> ApiError:
    return bad_request("url_not_allowed", f"url is not allowed: {reason}", "url")


async def check_destination(url: str, allowed: Iterable[IPNetwork], lookups: HostLookups) -> None:
    """Raise ApiError(400, url_not_allowed) if the URL's host is or resolves to a blocked address.

    `url` has passed `engine.core.urls.check_url` already. The wait for DNS is bounded by
    `lookups.timeout`; a lookup of a name that never answers stalls no other request.
    """
    allowed = tuple(allowed)
    parts = urlsplit(url)
    # A fully qualified name's final dot leads to the same place: `127.0.0.1.` and `localhost.`
    # are judged as `127.0.0.1` and `localhost` (as browsers' URL parsers read them).
    host = (parts.hostname or "").removesuffix(".")
    literal = host_ip(host)
    if literal is not None:
        if reason := blocked_reason(literal, allowed):
            raise _not_allowed(f"the host is {reason}")
        return
    # `*.localhost` is loopback by definition (RFC 6761), whatever the resolver says today.
    loopback = ipaddress.ip_address("127.0.0.1")
    if host.lower().endswith(".localhost") and blocked_reason(loopback, allowed):
        raise _not_allowed(f"{host} is a loopback name")
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    if not name:
        raise bad_request("invalid_url", "url host is not a valid host name", "url")
    try:
        answer = await lookups.lookup(name)
    except LookupFailedError as exc:
        log.info("webhook host did not resolve; accepted", extra={"host": name, "error": exc})
        return
    try:
        allowed_addresses(host, answer, allowed)
    except BlockedAddressError as exc:
        raise _not_allowed(str(exc).removeprefix("address not allowed: ")) from None

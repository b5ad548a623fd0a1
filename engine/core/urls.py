"""Webhook URL rules and the address block list (SSRF protection), all pure.

The same `blocked_reason` is applied at creation (to the URL's literal or resolved addresses)
and again at connection time (to the address actually dialled).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = [
    "MAX_URL_LENGTH",
    "IPAddress",
    "IPNetwork",
    "UrlError",
    "blocked_reason",
    "check_url",
    "host_ip",
]

MAX_URL_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Not globally reachable (IANA special-purpose registries; RFC 3879 for site-local), yet
# `ipaddress` before Python 3.11.10/3.12.4 (CVE-2024-4032) calls them global: listed here so
# the block list does not depend on the Python patch release.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("192.0.0.0/24"), "reserved"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
    (ipaddress.ip_network("3fff::/20"), "reserved"),
    (ipaddress.ip_network("5f00::/16"), "reserved"),
)
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")
# The ASCII a host name may hold (letters, digits, hyphen, dot, and the underscore some real
# names carry); anything else ASCII (`<`, `%`, `!`, …) names no host. Non-ASCII is IDN.
_HOST_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class UrlError(ValueError):
    """A webhook URL that breaks a rule; `code` is the API error code."""

    def __init__(self, message: str, code: str = "invalid_url") -> None:
        super().__init__(message)
        self.code = code


def check_url(url: str, *, allow_http: bool) -> str:
    """Return `url` if it may be a webhook URL, else raise UrlError saying why.

    This checks the form only; the caller resolves the host and applies `blocked_reason`.
    """
    if len(url) > MAX_URL_LENGTH:
        raise UrlError(f"url must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlError("url must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlError(f"url is malformed: {exc}") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme.lower() not in schemes:
        raise UrlError("url must be an absolute https URL")
    if not parts.netloc or not parts.hostname:
        raise UrlError("url must have a host")
    if "@" in parts.netloc:
        raise UrlError("url must not contain user information")
    if not parts.netloc.startswith("[") and any(
        c.isascii() and c not in _HOST_ASCII for c in parts.hostname
    ):
        raise UrlError("url host is not a valid host name")
    if "#" in url:
        raise UrlError("url must not contain a fragment")
    if port == 0:
        raise UrlError("url port must be between 1 and 65535")
    return url


def host_ip(host: str) -> IPAddress | None:
    """The address a host names literally, in any form a resolver would accept, else None.

    Besides dotted quads and IPv6 this catches the odd IPv4 spellings (`2130706433`, `0x7f.1`,
    `0177.0.0.1`, `127.1`) that getaddrinfo turns into addresses without a DNS query.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64 well-known prefix
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why deliveries must not go to `ip` ("a loopback address"), or None if they may.

    The reason never names the address: it may end up in a message to a customer whose host
    name resolved to it, and internal addresses are not theirs to see.

    Loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved and unspecified
    addresses are refused, also when wrapped in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64),
    unless a network in `allowed` covers the address.
    """
    allowed = tuple(allowed)
    inner = _embedded_ipv4(ip)
    for candidate in (ip, inner):
        if candidate is not None and any(
            candidate.version == net.version and candidate in net for net in allowed
        ):
            return None
    # A wrapped IPv4 address is judged by what it wraps: that is where packets end up.
    reason = _classify(inner if inner is not None else ip)
    if reason is None:
        return None
    return f"{'an' if reason[0] in 'aeiou' else 'a'} {reason} address"


def _classify(ip: IPAddress) -> str | None:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT"
    if ip.is_private:
        return "private"
    for net, label in _SPECIAL:
        if ip.version == net.version and ip in net:
            return label
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None

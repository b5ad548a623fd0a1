"""Property and table tests for webhook URL rules and the private-address block list.

Oracles are independent of the code under test: glibc's own numeric-host parser
(`getaddrinfo(..., AI_NUMERICHOST)`) for odd IPv4 spellings, and the IANA special-purpose
registries (as ranges written out here) for what must be blocked.
"""

from __future__ import annotations

import ipaddress
import socket
import string

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine.core.urls import MAX_URL_LENGTH, UrlError, blocked_reason, check_url, host_ip
from engine.delivery.resolver import BlockedAddressError, check_host

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generated URLs are costlier to draw; fewer examples keep the suite quick on shared cores.
URLS = settings(PROPERTY, max_examples=100)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# Ranges deliveries must never reach (IANA IPv4/IPv6 special-purpose registries, RFC 6890).
MUST_BLOCK_V4 = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
MUST_BLOCK_V6 = [
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",  # deprecated site-local, still routed inside some networks
    "ff00::/8",
    "2001:db8::/32",
    "100::/64",
]

ipv4s = st.integers(min_value=0, max_value=2**32 - 1).map(IPv4)
ipv6s = st.integers(min_value=0, max_value=2**128 - 1).map(IPv6)


def _in_net(cidrs: list[str]) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return st.sampled_from(nets).flatmap(
        lambda n: st.integers(0, n.num_addresses - 1).map(lambda i: n[i])
    )


def mapped(v4: IPv4) -> IPv6:
    return IPv6(f"::ffff:{v4}")


def nat64(v4: IPv4) -> IPv6:
    return IPv6(int(IPv6("64:ff9b::")) | int(v4))


def sixtofour(v4: IPv4) -> IPv6:
    return IPv6((0x2002 << 112) | (int(v4) << 80) | 1)


# ---------------------------------------------------------------- the block list


@PROPERTY
@given(_in_net(MUST_BLOCK_V4 + MUST_BLOCK_V6))
def test_special_purpose_addresses_are_blocked(ip: ipaddress.IPv4Address | IPv6) -> None:
    reason = blocked_reason(ip)
    assert reason is not None
    assert str(ip) not in reason  # the kind of address, never the address itself


@PROPERTY
@given(_in_net(MUST_BLOCK_V4))
def test_wrapped_special_ipv4_is_blocked_in_every_wrapping(v4: IPv4) -> None:
    for wrapped in (mapped(v4), nat64(v4), sixtofour(v4)):
        assert blocked_reason(wrapped) is not None, wrapped


@PROPERTY
@given(ipv4s)
def test_ipv4_mapped_and_nat64_are_judged_like_the_address_they_carry(v4: IPv4) -> None:
    plain = blocked_reason(v4) is None
    assert (blocked_reason(mapped(v4)) is None) == plain
    assert (blocked_reason(nat64(v4)) is None) == plain


@PROPERTY
@given(ipv4s)
def test_ipv4_blocking_matches_the_global_unicast_oracle(v4: IPv4) -> None:
    in_special = any(v4 in ipaddress.ip_network(c) for c in MUST_BLOCK_V4)
    if in_special:
        assert blocked_reason(v4) is not None
    elif v4.is_global:
        assert blocked_reason(v4) is None, v4


@PROPERTY
@given(st.one_of(ipv4s, ipv6s), st.integers(0, 32), st.integers(0, 128))
def test_an_allowed_network_exempts_every_address_inside_it(
    ip: ipaddress.IPv4Address | IPv6, len4: int, len6: int
) -> None:
    prefix = len4 if ip.version == 4 else len6
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    assert blocked_reason(ip, [net]) is None
    if isinstance(ip, IPv4):
        # ... also when the same address is dialled through an IPv4-mapped form.
        assert blocked_reason(mapped(ip), [net]) is None


@PROPERTY
@given(_in_net(MUST_BLOCK_V4 + MUST_BLOCK_V6), _in_net(MUST_BLOCK_V4 + MUST_BLOCK_V6))
def test_an_allowed_network_exempts_nothing_outside_it(
    ip: ipaddress.IPv4Address | IPv6, other: ipaddress.IPv4Address | IPv6
) -> None:
    net = ipaddress.ip_network(f"{other}/{other.max_prefixlen}")
    assume(ip != other)
    assert blocked_reason(ip, [net]) is not None


@pytest.mark.parametrize(
    ("ip", "word"),
    [
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("fec0::1", "site-local"),
        ("fd00:ec2::254", "private"),  # AWS IPv6 metadata endpoint
    ],
)
def test_refusals_say_why(ip: str, word: str) -> None:
    reason = blocked_reason(ipaddress.ip_address(ip))
    assert reason is not None
    assert word in reason


@pytest.mark.parametrize(
    "ip",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_pass(ip: str) -> None:
    assert blocked_reason(ipaddress.ip_address(ip)) is None


# ---------------------------------------------------------------- odd IPv4 spellings


ODD_LOOPBACK = [
    "0x7f.1",
    "0X7F.1",
    "2130706433",
    "0177.0.0.1",
    "127.1",
    "127.0.1",
    "0x7f000001",
    "0x7F000001",
    "017700000001",
    "0x7f.0x0.0x0.0x1",
    "0177.0.0.01",
    "127.000.000.001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
]


@pytest.mark.parametrize("host", ODD_LOOPBACK)
def test_odd_loopback_spellings_are_recognised_and_refused(host: str) -> None:
    ip = host_ip(host)
    assert ip is not None
    assert blocked_reason(ip) is not None
    with pytest.raises(BlockedAddressError, match="not allowed"):
        check_host(host, ())


def _numeric_ipv4(host: str) -> IPv4 | None:
    """What the C library would dial for `host` without any DNS query."""
    try:
        infos = socket.getaddrinfo(
            host, 443, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
    except (socket.gaierror, UnicodeError):
        return None
    return IPv4(infos[0][4][0])


def _spellings(v4: IPv4) -> st.SearchStrategy[str]:
    n = int(v4)
    octets = [int(o) for o in str(v4).split(".")]

    def part(value: int, style: str) -> str:
        return {
            "dec": str(value),
            "hex": hex(value),
            "HEX": "0X" + format(value, "X"),
            "oct": "0" + format(value, "o"),
        }[style]

    styles = st.sampled_from(["dec", "hex", "HEX", "oct"])
    whole = styles.map(lambda s: part(n, s))
    four = st.lists(styles, min_size=4, max_size=4).map(
        lambda ss: ".".join(part(o, s) for o, s in zip(octets, ss, strict=True))
    )
    three = st.lists(styles, min_size=3, max_size=3).map(
        lambda ss: ".".join(
            part(v, s) for v, s in zip([octets[0], octets[1], n & 0xFFFF], ss, strict=True)
        )
    )
    two = st.lists(styles, min_size=2, max_size=2).map(
        lambda ss: ".".join(part(v, s) for v, s in zip([octets[0], n & 0xFFFFFF], ss, strict=True))
    )
    return st.one_of(whole, four, three, two)


@PROPERTY
@given(ipv4s.flatmap(lambda v4: st.tuples(st.just(v4), _spellings(v4))))
def test_every_numeric_spelling_of_an_ipv4_address_is_recognised(pair: tuple[IPv4, str]) -> None:
    v4, spelling = pair
    assert _numeric_ipv4(spelling) == v4  # the oracle agrees the spelling means v4
    assert host_ip(spelling) == v4
    assert (blocked_reason(v4) is None) == (blocked_reason(host_ip(spelling)) is None)  # type: ignore[arg-type]


@PROPERTY
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=20))
@example("0X7F.1")
@example("00")
@example("1.")
def test_host_ip_agrees_with_the_c_library_on_numeric_hosts(host: str) -> None:
    expected = _numeric_ipv4(host)
    got = host_ip(host)
    if expected is not None:
        # Whatever the resolver would dial without DNS, host_ip must see too.
        assert got == expected
    elif isinstance(got, IPv4):
        raise AssertionError(f"host_ip({host!r}) = {got} but the C library does not take it")


# ---------------------------------------------------------------- check_url


hostnames = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\.[a-z]{2,6}\Z")
paths = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~/%!$&'()*+,;=:@", max_size=100
).map(lambda p: "/" + p)
queries = st.text(alphabet=string.ascii_letters + string.digits + "=&-_.", max_size=40)


@st.composite
def good_urls(draw: st.DrawFn) -> str:
    host = draw(st.one_of(hostnames, ipv4s.map(str), ipv6s.map(lambda a: f"[{a}]")))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    url = f"https://{host}" + (f":{port}" if port else "") + draw(paths)
    if query := draw(queries):
        url += "?" + query
    return url


@URLS
@given(good_urls())
def test_well_formed_https_urls_are_accepted_unchanged(url: str) -> None:
    assume(len(url) <= MAX_URL_LENGTH)
    assert check_url(url, allow_http=False) == url


@URLS
@given(good_urls(), st.sampled_from(["http", "ftp", "file", "gopher", "ws", "javascript"]))
def test_only_https_unless_http_is_allowed(url: str, scheme: str) -> None:
    other = scheme + url.removeprefix("https")
    with pytest.raises(UrlError):
        check_url(other, allow_http=False)
    if scheme == "http":
        assert check_url(other, allow_http=True) == other


@URLS
@given(good_urls(), st.text(alphabet=string.ascii_letters + ":", min_size=0, max_size=10))
def test_user_information_is_refused(url: str, userinfo: str) -> None:
    with pytest.raises(UrlError, match="user information"):
        check_url(url.replace("https://", f"https://{userinfo}@", 1), allow_http=False)


@URLS
@given(good_urls(), st.text(max_size=10))
def test_fragments_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(UrlError):
        check_url(f"{url}#{fragment}", allow_http=False)


@URLS
@given(
    good_urls(),
    st.sampled_from([" ", "\t", "\n", "\r", "\x00", "\x0b", "\x1f", "\u3000"]),
    st.integers(0, 200),
)
def test_whitespace_and_control_characters_are_refused(url: str, bad: str, at: int) -> None:
    at = min(at, len(url))
    with pytest.raises(UrlError):
        check_url(url[:at] + bad + url[at:], allow_http=False)


@URLS
@given(st.integers(MAX_URL_LENGTH + 1, 3 * MAX_URL_LENGTH))
def test_overlong_urls_are_refused(length: int) -> None:
    url = "https://example.com/"
    url += "a" * (length - len(url))
    with pytest.raises(UrlError, match=str(MAX_URL_LENGTH)):
        check_url(url, allow_http=False)
    assert check_url(url[:MAX_URL_LENGTH], allow_http=False)


@URLS
@given(st.text(max_size=300), st.booleans())
@example("https://[::1", False)
@example("https://example.com:-1/", False)
@example("https://example.com:0/", False)
@example("https://[v1.fe]/", False)
def test_any_input_is_accepted_or_refused_with_a_url_error(text: str, allow_http: bool) -> None:
    try:
        assert check_url(text, allow_http=allow_http) == text
    except UrlError as exc:
        assert str(exc)
        assert exc.code == "invalid_url"

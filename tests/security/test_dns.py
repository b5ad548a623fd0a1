"""Host-name lookups cost only their own name (docs/contract.md §7).

A DNS server of the test's own on 127.0.0.1 (tests/security/fake_dns.py) answers some names,
refuses others and swallows the rest; the resolver is pointed at it through its own
configuration (`nameservers`), never the machine's resolv.conf.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from engine.delivery.dns import Answer, HostLookups, LookupFailedError
from engine.delivery.resolver import BlockedAddressError, SafeResolver
from engine.settings import Settings, SettingsError
from tests.security.fake_dns import FakeDns

PUBLIC = "93.184.216.34"
PRIVATE = "10.1.2.3"


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    server = await FakeDns(
        records={
            "ok.test": ([PUBLIC], 300),
            "internal.test": ([PRIVATE], 300),
            "mixed.test": ([PUBLIC, PRIVATE], 300),
        },
        hang={f"hang{i}.test" for i in range(50)},
    ).start()
    yield server
    server.stop()


def addresses(answer: Answer) -> list[str]:
    return [address for _, address in answer.addresses]


async def eventually(check: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    """Poll `check` until it holds; fail if it does not within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if await outcome if inspect.isawaitable(outcome) else outcome:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- isolation


async def test_names_that_never_answer_delay_no_other_lookup(fake_dns: FakeDns) -> None:
    # A long timeout: the hanging lookups are all still waiting while the others complete.
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=60.0)
    try:
        hanging = [asyncio.create_task(lookups.lookup(f"hang{i}.test")) for i in range(40)]
        await eventually(lambda: fake_dns.asked("hang39.test") > 0)
        async with asyncio.timeout(10):
            by_hosts_file = await lookups.lookup("localhost")
            by_dns = await lookups.lookup("ok.test")
        assert "127.0.0.1" in addresses(by_hosts_file)
        assert addresses(by_dns) == [PUBLIC]
        assert not any(task.done() for task in hanging)
        assert lookups.in_flight == 40
    finally:
        await lookups.close()
    for task in hanging:
        with pytest.raises(LookupFailedError, match="stopped: shutting down"):
            await task


async def test_a_hanging_lookup_fails_after_the_dns_timeout_and_its_query_ends(
    fake_dns: FakeDns,
) -> None:
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=0.6)
    try:
        started = time.monotonic()
        with pytest.raises(LookupFailedError) as caught:
            await lookups.lookup("hang1.test")
        # c-ares gives up after two tries of a third of the timeout each, or the wait ends.
        assert time.monotonic() - started < 10
        assert str(caught.value) in {
            "DNS lookup of hang1.test did not finish within 0.6s",
            "DNS servers did not answer for hang1.test",
        }
        # Not only the wait: the c-ares query itself gives up, and the name is free again.
        await eventually(lambda: lookups.in_flight == 0)
        asked = fake_dns.asked("hang1.test")
        # The failure is remembered briefly: another delivery to it sends no new query.
        with pytest.raises(LookupFailedError, match=r"hang1\.test"):
            await lookups.lookup("hang1.test")
        assert fake_dns.asked("hang1.test") == asked
    finally:
        await lookups.close()


async def test_a_name_that_does_not_exist_says_so(fake_dns: FakeDns) -> None:
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=5.0)
    try:
        with pytest.raises(LookupFailedError, match=r"^nowhere\.test does not resolve$"):
            await lookups.lookup("nowhere.test")
    finally:
        await lookups.close()


# ---------------------------------------------------------------- sharing and caching


async def test_concurrent_lookups_of_one_name_share_one_query(fake_dns: FakeDns) -> None:
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=5.0)
    try:
        answers = await asyncio.gather(*(lookups.lookup("ok.test") for _ in range(25)))
    finally:
        await lookups.close()
    assert all(addresses(a) == [PUBLIC] for a in answers)
    assert fake_dns.asked("ok.test") == 1
    assert lookups.queries == 1


async def test_joining_a_hanging_lookup_sends_no_second_query(fake_dns: FakeDns) -> None:
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=60.0)
    try:
        waiters = [asyncio.create_task(lookups.lookup("hang2.test")) for _ in range(10)]
        await eventually(lambda: fake_dns.asked("hang2.test") > 0)
        await asyncio.sleep(0.2)
        assert lookups.queries == 1
        assert lookups.in_flight == 1
        # c-ares may have retried by now, but never ten times over.
        assert fake_dns.asked("hang2.test") <= 2
    finally:
        await lookups.close()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_an_answer_is_reused_within_its_ttl_and_refreshed_after(fake_dns: FakeDns) -> None:
    record_ttl = 1
    fake_dns.records["moving.test"] = ([PUBLIC], record_ttl)
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=5.0)
    try:
        first = await lookups.lookup("moving.test")
        started = time.monotonic()
        fake_dns.records["moving.test"] = (["93.184.216.35"], record_ttl)
        again = await lookups.lookup("moving.test")
        assert addresses(first) == addresses(again) == [PUBLIC]
        assert fake_dns.asked("moving.test") == 1

        async def refreshed() -> bool:
            return addresses(await lookups.lookup("moving.test")) == ["93.184.216.35"]

        await eventually(refreshed, within=15)
        # Not before the TTL ran out.
        assert time.monotonic() - started >= record_ttl * 0.9
        assert fake_dns.asked("moving.test") == 2
    finally:
        await lookups.close()


async def test_a_failure_is_remembered_briefly_then_asked_again(fake_dns: FakeDns) -> None:
    lookups = HostLookups(nameservers=[fake_dns.server], timeout=5.0, negative_ttl=0.5)
    try:
        for _ in range(5):
            with pytest.raises(LookupFailedError):
                await lookups.lookup("late.test")
        assert fake_dns.asked("late.test") == 1
        fake_dns.records["late.test"] = ([PUBLIC], 60)

        async def resolves() -> bool:
            try:
                await lookups.lookup("late.test")
            except LookupFailedError:
                return False
            return True

        await eventually(resolves)
        assert fake_dns.asked("late.test") == 2
    finally:
        await lookups.close()


# ---------------------------------------------------------------- the safe resolver


async def test_the_safe_resolver_returns_only_checked_addresses(fake_dns: FakeDns) -> None:
    safe = SafeResolver(nameservers=[fake_dns.server], timeout=5.0)
    try:
        results = await safe.resolve("ok.test", 8443, socket.AF_UNSPEC)
        assert [(r["host"], r["port"], r["family"]) for r in results] == [
            (PUBLIC, 8443, socket.AF_INET)
        ]
        with pytest.raises(BlockedAddressError) as caught:
            await safe.resolve("internal.test", 443, socket.AF_UNSPEC)
        assert (
            str(caught.value) == "address not allowed: internal.test resolves to a private address"
        )
        assert PRIVATE not in str(caught.value)
        # A name with a blocked address beside an allowed one is dialled only at the allowed one.
        mixed = await safe.resolve("mixed.test", 443, socket.AF_UNSPEC)
        assert [r["host"] for r in mixed] == [PUBLIC]
    finally:
        await safe.close()


async def test_localhost_is_dialled_at_an_allowed_loopback_address_only() -> None:
    # c-ares answers `localhost` with ::1 beside 127.0.0.1; with only 127.0.0.0/8 allowed (the
    # usual setting for local receivers) the name still works, and ::1 is never dialled.
    safe = SafeResolver([ipaddress.ip_network("127.0.0.0/8")], timeout=5.0)
    try:
        results = await safe.resolve("localhost", 443, socket.AF_UNSPEC)
        assert [r["host"] for r in results] == ["127.0.0.1"]
    finally:
        await safe.close()
    with pytest.raises(BlockedAddressError, match="loopback address"):
        refusing = SafeResolver(timeout=5.0)
        try:
            await refusing.resolve("localhost", 443, socket.AF_UNSPEC)
        finally:
            await refusing.close()


async def test_the_safe_resolver_checks_a_cached_answer_every_time(fake_dns: FakeDns) -> None:
    safe = SafeResolver(nameservers=[fake_dns.server], timeout=5.0)
    try:
        for _ in range(3):
            with pytest.raises(BlockedAddressError, match="private address"):
                await safe.resolve("internal.test", 443, socket.AF_UNSPEC)
    finally:
        await safe.close()
    assert fake_dns.asked("internal.test") == 1  # cached, and still refused


async def test_a_hanging_name_fails_the_safe_resolver_with_a_clear_error(
    fake_dns: FakeDns,
) -> None:
    safe = SafeResolver(nameservers=[fake_dns.server], timeout=0.5)
    try:
        with pytest.raises(LookupFailedError, match=r"hang3\.test"):
            await safe.resolve("hang3.test", 443, socket.AF_UNSPEC)
    finally:
        await safe.close()


# ---------------------------------------------------------------- settings


def test_dns_settings_are_read_and_validated() -> None:
    settings = Settings.from_env(
        {
            "CARGOLINT_DNS_TIMEOUT": "2.5",
            "CARGOLINT_DNS_SERVERS": "10.0.0.53, 127.0.0.1:5353,[::1]:53,fd00::53",
        }
    )
    assert settings.dns_timeout == 2.5
    assert settings.dns_servers == ("10.0.0.53", "127.0.0.1:5353", "[::1]:53", "fd00::53")
    assert Settings.from_env({}).dns_servers == ()  # the system's resolv.conf
    for variable, value in [
        ("CARGOLINT_DNS_TIMEOUT", "0"),
        ("CARGOLINT_DNS_TIMEOUT", "soon"),
        ("CARGOLINT_DNS_SERVERS", "dns.example.com"),
        ("CARGOLINT_DNS_SERVERS", "127.0.0.1:0"),
        ("CARGOLINT_DNS_SERVERS", "127.0.0.1:x"),
    ]:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({variable: value})
        assert caught.value.variable == variable
        assert str(caught.value).startswith(f"{variable}: ")

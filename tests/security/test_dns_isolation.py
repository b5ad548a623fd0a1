"""A host name that never resolves delays nobody else (docs/contract.md §7): not the API's
creation check, not another delivery. Refusals never name the addresses a name resolved to.

The DNS server is the test's own (tests/security/fake_dns.py), given through
CARGOLINT_DNS_SERVERS' setting, never the machine's resolv.conf.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.core.signing import request_headers
from engine.delivery import Sender
from engine.delivery.resolver import SafeResolver
from engine.settings import Settings
from engine.store.accounts import create_account
from tests.api.conftest import Client, start_api
from tests.conftest import with_
from tests.receiver import Receiver
from tests.security.fake_dns import FakeDns

PUBLIC = "93.184.216.34"
PRIVATE = "10.1.2.3"
HANGING = [f"hang{i}.test" for i in range(12)]
BODY = b'{"event":"document.uploaded","data":{}}'


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    server = await FakeDns(
        records={"ok.test": ([PUBLIC], 300), "internal.test": ([PRIVATE], 300)},
        hang=set(HANGING),
    ).start()
    yield server
    server.stop()


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_hanging_name_stalls_no_other_webhook_creation(
    fake_dns: FakeDns, settings: Settings, pool: asyncpg.Pool[Any]
) -> None:
    api_settings = with_(settings, dns_servers=(fake_dns.server,), dns_timeout=6.0)
    runner, base = await start_api(api_settings, pool)
    async with pool.acquire() as conn:
        _, key = await create_account(conn, name="Dns", plan="business", mode="test")
    try:
        async with aiohttp.ClientSession() as http:
            client = Client(http, base, key)

            async def create(host: str) -> tuple[int, Any, Any]:
                body = {"url": f"https://{host}/hook", "events": ["document.uploaded"]}
                return await client.call("POST", "/api/v1/webhooks", json=body)

            hanging = [asyncio.create_task(create(host)) for host in HANGING]
            await eventually(lambda: all(fake_dns.asked(h) for h in HANGING))

            created = await client.create("https://ok.test/hook")
            status, refused, _ = await create("internal.test")
            assert not any(task.done() for task in hanging)

            assert created["url"] == "https://ok.test/hook"
            assert status == 400
            assert refused["error"]["code"] == "url_not_allowed"
            assert refused["error"]["message"] == (
                "url is not allowed: internal.test resolves to a private address"
            )
            assert PRIVATE not in str(refused)
            status, literal, _ = await create("10.0.0.1")
            assert status == 400
            assert (
                literal["error"]["message"] == "url is not allowed: the host is a private address"
            )
            # A name that does not resolve in time is accepted: the connection-time check
            # still guards every delivery to it.
            for status, body, _ in await asyncio.gather(*hanging):
                assert status == 201, body
    finally:
        await runner.cleanup()


async def test_deliveries_to_hanging_names_delay_no_other_delivery(
    fake_dns: FakeDns, settings: Settings, receiver: Receiver
) -> None:
    # c-ares answers `localhost` with ::1 as well as /etc/hosts' 127.0.0.1 (RFC 6761).
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    dns_settings = with_(
        settings, dns_servers=(fake_dns.server,), dns_timeout=30.0, allowed_networks=loopback
    )
    headers = request_headers(
        secret="whsec_dns", body=BODY, event_type="document.uploaded", delivery_id="dlv_dns"
    )
    resolver = SafeResolver.from_settings(dns_settings)
    async with Sender(dns_settings, resolver=resolver) as sender:
        hanging = [
            asyncio.create_task(sender.send(f"https://{host}:{receiver.port}/x", BODY, headers))
            for host in HANGING
        ]
        await eventually(lambda: all(fake_dns.asked(h) for h in HANGING))
        # `localhost` comes from /etc/hosts, not from DNS.
        outcome = await sender.send(f"https://localhost:{receiver.port}/ok", BODY, headers)
        assert outcome.succeeded, outcome
        assert len(receiver.requests) == 1
        assert not any(task.done() for task in hanging)
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
    await resolver.close()  # the Sender does not own a resolver it was given


async def test_a_hanging_name_fails_its_delivery_with_a_clear_error(
    fake_dns: FakeDns, settings: Settings, receiver: Receiver
) -> None:
    dns_settings = with_(settings, dns_servers=(fake_dns.server,), dns_timeout=0.5)
    headers = request_headers(
        secret="whsec_dns", body=BODY, event_type="document.uploaded", delivery_id="dlv_dns"
    )
    resolver = SafeResolver.from_settings(dns_settings)
    async with Sender(dns_settings, resolver=resolver) as sender:
        outcome = await sender.send(f"https://hang0.test:{receiver.port}/x", BODY, headers)
        refused = await sender.send(f"https://internal.test:{receiver.port}/x", BODY, headers)
    await resolver.close()
    assert not outcome.succeeded
    assert outcome.error is not None
    assert "hang0.test" in outcome.error
    assert "did not" in outcome.error, outcome.error
    assert refused.error_class == "blocked_address"
    assert refused.error is not None
    assert "internal.test resolves to a private address" in refused.error
    assert PRIVATE not in refused.error
    assert receiver.requests == []

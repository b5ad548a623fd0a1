"""Address blocking with no allowed networks, rate limits, metrics, health, the 500 path, logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from engine.api.errors import error_middleware
from engine.logs import JsonFormatter
from engine.settings import Settings
from tests.api.conftest import Client, MakeAccount, start_api
from tests.api.test_webhooks import assert_error
from tests.conftest import with_
from tests.receiver import Receiver


@pytest.fixture(scope="module")
async def strict_api(api_settings: Settings, pool: asyncpg.Pool[Any]) -> AsyncIterator[str]:
    """The API as deployed by default: no network exempt from the block list."""
    runner, url = await start_api(with_(api_settings, allowed_networks=()), pool)
    yield url
    await runner.cleanup()


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://127.0.0.1:8443/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/hook",
        "https://LOCALHOST:9000/hook",
        "https://0x7f.1/hook",
        "https://2130706433/hook",
        "https://0177.0.0.1/hook",
        "https://127.1/hook",
        "https://[fe80::1]/hook",
        "https://[fc00::1]/hook",
        # A final dot names the same host.
        "https://127.0.0.1./hook",
        "https://2130706433./hook",
        "https://localhost./hook",
        "https://LOCALHOST.:9000/hook",
        # Loopback by definition (RFC 6761), whatever this machine's resolver says of them.
        "https://hooks.localhost/hook",
        "https://a.b.LOCALHOST.:8443/hook",
    ],
)
async def test_blocked_destinations_are_refused(
    http: aiohttp.ClientSession, strict_api: str, make_account: MakeAccount, url: str
) -> None:
    client = Client(http, strict_api, (await make_account()).key)
    status, body, _ = await client.call(
        "POST", "/api/v1/webhooks", json={"url": url, "events": ["document.uploaded"]}
    )
    assert status == 400, body
    assert_error(body, "url_not_allowed", "url")
    created = await client.create("https://example.com/hook")
    status, body, _ = await client.call(
        "PUT", f"/api/v1/webhooks/{created['id']}", json={"url": url}
    )
    assert status == 400
    assert_error(body, "url_not_allowed", "url")


async def test_unresolvable_names_and_public_addresses_are_accepted(
    http: aiohttp.ClientSession, strict_api: str, make_account: MakeAccount
) -> None:
    client = Client(http, strict_api, (await make_account()).key)
    for url in (
        "https://example.com/hook",
        "https://hooks.customer.invalid/x?y=1",
        "https://93.184.216.34/hook",
        "https://[2606:2800:220:1::]/hook",
    ):
        created = await client.create(url)
        assert created["url"] == url


async def test_allowed_networks_exempt_local_receivers(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, receiver: Receiver
) -> None:
    # The session's settings allow 127.0.0.0/8 only: ::1 and 10/8 stay blocked.
    client = Client(http, api, (await make_account()).key)
    await client.create(f"{receiver.url}/ok")
    for url in ("https://[::1]/", "https://10.0.0.1/"):
        status, body, _ = await client.call(
            "POST", "/api/v1/webhooks", json={"url": url, "events": ["document.uploaded"]}
        )
        assert (status, body["error"]["code"]) == (400, "url_not_allowed")


async def test_http_urls_only_when_allowed(
    http: aiohttp.ClientSession, api_settings: Settings, pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
) -> None:  # fmt: skip
    runner, base = await start_api(with_(api_settings, allow_http=True), pool)
    try:
        client = Client(http, base, (await make_account()).key)
        created = await client.create("http://example.com/hook")
        assert created["url"] == "http://example.com/hook"
    finally:
        await runner.cleanup()


async def test_rate_limit_is_429_with_retry_after(
    http: aiohttp.ClientSession, api_settings: Settings, pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
) -> None:  # fmt: skip
    runner, base = await start_api(with_(api_settings, api_rate_limit=0.5, api_rate_burst=3), pool)
    try:
        client = Client(http, base, (await make_account()).key)
        other = Client(http, base, (await make_account()).key)
        statuses = [(await client.call("GET", "/api/v1/webhooks"))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        status, body, headers = await client.call("GET", "/api/v1/webhooks")
        assert status == 429
        assert_error(body, "rate_limited")
        assert headers["Retry-After"] == "2"
        # Limits are per key.
        assert (await other.call("GET", "/api/v1/webhooks"))[0] == 200
    finally:
        await runner.cleanup()


async def test_metrics_and_health(client: Client, api: str, http: aiohttp.ClientSession) -> None:
    created = await client.create("https://example.com/m")
    await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    await client.call("GET", "/api/v1/webhooks/wh_000000000000")
    await client.call("GET", "/no/such/path")
    async with http.get(api + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    async with http.get(api + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert (
        'cargolint_webhooks_api_requests_total{method="GET",route="/api/v1/webhooks/{id}",status="200"}'
        in text
    )
    assert (
        'cargolint_webhooks_api_requests_total{method="GET",route="/api/v1/webhooks/{id}",status="404"}'
        in text
    )
    assert (
        'cargolint_webhooks_api_requests_total{method="POST",route="/api/v1/webhooks",status="201"}'
        in text
    )
    assert (
        'cargolint_webhooks_api_requests_total{method="GET",route="unmatched",status="404"}' in text
    )
    assert (
        'cargolint_webhooks_api_request_duration_seconds_bucket{le="0.001",method="GET",route="/api/v1/webhooks/{id}"}'
        in text
    )
    assert created["id"] not in text  # never an id as a label


async def test_openapi_is_served_without_auth(api: str, http: aiohttp.ClientSession) -> None:
    async with http.get(api + "/api/v1/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        doc = await response.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


async def test_unexpected_errors_are_a_bare_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(_: web.Request) -> web.Response:
        raise RuntimeError("SELECT secret FROM webhooks -- internal detail")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/boom", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            with caplog.at_level(logging.ERROR, logger="engine.api.errors"):
                async with http.get(f"http://127.0.0.1:{port}/boom") as response:
                    assert response.status == 500
                    text = await response.text()
    finally:
        await runner.cleanup()
    assert "SELECT" not in text
    assert "Traceback" not in text
    assert '"internal_error"' in text
    [record] = [r for r in caplog.records if r.name == "engine.api.errors"]
    assert record.path == "/boom"  # type: ignore[attr-defined]
    assert record.exc_info is not None


async def test_logs_never_hold_keys_or_secrets(
    client: Client, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        created = await client.create(f"{receiver.url}/hook")
        await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
        assert client.key is not None
        await client.call("GET", "/api/v1/webhooks", headers={"X-API-Key": client.key + "x"})
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert created["id"] in text  # the logs do name the webhook
    assert client.key is not None
    assert client.key[8:] not in text
    assert created["secret"][11:] not in text

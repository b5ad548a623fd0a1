"""docs/contract.md §1's rules on every route §6 adds: 401, 403, 404 isolation, 405 with Allow,
413, 415, unknown fields, and `field` always present."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.api.conftest import Account, Client, MakeAccount
from tests.api.deliveries import add_delivery
from tests.api.test_webhooks import HOOK, assert_error

SINCE = {"since": "2020-01-01T00:00:00Z"}


@pytest.fixture
async def paths(client: Client, account: Account, pool: asyncpg.Pool[Any]) -> dict[str, str]:
    """Every new route on a real webhook and delivery of `client`'s account."""
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id, status="failed", attempts=1)
    hook = f"/api/v1/webhooks/{created['id']}"
    return {
        "event_types": "/api/v1/event-types",
        "detail": f"{hook}/deliveries/{dlv}",
        "retry": f"{hook}/deliveries/{dlv}/retry",
        "recover": f"{hook}/recover",
        "rotate": f"{hook}/rotate-secret",
        "filtered": f"{hook}/deliveries?status=failed&event=document.uploaded",
    }


CALLS = [
    ("GET", "event_types", None),
    ("GET", "detail", None),
    ("GET", "filtered", None),
    ("POST", "retry", None),
    ("POST", "recover", SINCE),
    ("POST", "rotate", None),
]


async def test_a_missing_or_unknown_key_is_401(
    http: aiohttp.ClientSession, api: str, paths: dict[str, str]
) -> None:
    for key in (None, "sk_test_" + "a" * 40, "nonsense"):
        anonymous = Client(http, api, key)
        for method, name, payload in CALLS:
            status, body, headers = await anonymous.call(method, paths[name], json=payload)
            assert status == 401, (key, name)
            assert_error(body, "unauthorized")
            assert headers["WWW-Authenticate"] == "X-API-Key"


async def test_a_plan_without_webhooks_is_403(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, paths: dict[str, str]
) -> None:
    starter = Client(http, api, (await make_account(plan="starter")).key)
    for method, name, payload in CALLS:
        status, body, _ = await starter.call(method, paths[name], json=payload)
        assert status == 403, name
        assert_error(body, "plan_required")
        assert body["error"]["message"] == (
            "Webhook access is available on Business and Enterprise plans"
        )


async def test_another_account_or_mode_gets_404_and_changes_nothing(
    http: aiohttp.ClientSession,
    api: str,
    make_account: MakeAccount,
    paths: dict[str, str],
    pool: asyncpg.Pool[Any],
) -> None:
    from engine.store.accounts import create_key

    owner_id = await pool.fetchval(
        "SELECT account_id FROM webhooks WHERE id = $1", paths["rotate"].split("/")[4]
    )
    live = await create_key(pool, account_id=owner_id, mode="live")
    assert live is not None
    before = await pool.fetchrow(
        "SELECT secret, updated_at FROM webhooks WHERE id = $1", paths["rotate"].split("/")[4]
    )
    for key in ((await make_account()).key, live.api_key):
        stranger = Client(http, api, key)
        for method, name, payload in CALLS[1:]:
            status, body, _ = await stranger.call(method, paths[name], json=payload)
            assert status == 404, name
            assert_error(body, "not_found")
    after = await pool.fetchrow(
        "SELECT secret, updated_at FROM webhooks WHERE id = $1", paths["rotate"].split("/")[4]
    )
    assert after == before


async def test_wrong_methods_are_405_with_allow(client: Client, paths: dict[str, str]) -> None:
    for method, name, allowed in [
        ("POST", "event_types", "GET"),
        ("DELETE", "detail", "GET"),
        ("PUT", "detail", "GET"),
        ("GET", "retry", "POST"),
        ("GET", "recover", "POST"),
        ("DELETE", "rotate", "POST"),
    ]:
        status, body, headers = await client.call(method, paths[name])
        assert status == 405, (method, name)
        assert_error(body, "method_not_allowed")
        assert allowed in headers["Allow"]


@pytest.mark.parametrize("name", ["retry", "recover", "rotate"])
async def test_bodies_over_64_kib_are_413_and_non_json_415(
    client: Client, paths: dict[str, str], name: str
) -> None:
    big = b'{"since": "' + b"x" * (64 * 1024) + b'"}'
    status, body, _ = await client.call(
        "POST", paths[name], data=big, headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert_error(body, "payload_too_large")

    async def chunks() -> Any:
        for _ in range(80):
            yield b" " * 1024

    status, body, _ = await client.call(
        "POST", paths[name], data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert_error(body, "payload_too_large")

    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, body, _ = await client.call(
            "POST", paths[name], data=b'{"since": "x"}', headers={"Content-Type": content_type}
        )
        assert status == 415
        assert_error(body, "unsupported_media_type")


@pytest.mark.parametrize(("name", "base"), [("retry", {}), ("recover", SINCE), ("rotate", {})])
async def test_unknown_fields_are_400_naming_them(
    client: Client, paths: dict[str, str], name: str, base: dict[str, Any]
) -> None:
    status, body, _ = await client.call("POST", paths[name], json={**base, "extra": 1})
    assert status == 400
    assert_error(body, "unknown_field", "extra")


async def test_the_event_types_catalogue_needs_no_account_data(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount
) -> None:
    # Any key with webhook access sees the same catalogue, live or test.
    test_key = Client(http, api, (await make_account()).key)
    live_key = Client(http, api, (await make_account(mode="live")).key)
    first = await test_key.call("GET", "/api/v1/event-types")
    second = await live_key.call("GET", "/api/v1/event-types")
    assert first[0] == second[0] == 200
    assert first[1] == second[1]

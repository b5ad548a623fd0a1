"""The Webhooks API end to end: every endpoint, every error class, isolation, NOTIFY."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.settings import Settings
from engine.store.db import NOTIFY_CHANNEL, connect
from tests.api.conftest import Account, Client, MakeAccount, start_api
from tests.conftest import with_

HOOK = "https://example.com/hook"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def assert_error(body: Any, code: str, field: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert body["error"]["message"]


async def test_create_returns_the_webhook_with_its_secret(client: Client) -> None:
    status, body, headers = await client.call(
        "POST",
        "/api/v1/webhooks",
        json={
            "url": HOOK,
            "events": ["compliance.warning", "document.uploaded"],
            "description": "ops",
        },
    )
    assert status == 201
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {
        "id", "url", "events", "active", "description", "createdAt", "updatedAt", "secret",
        "previousSecretExpiresAt", "disabledReason", "disabledAt",
    }  # fmt: skip
    assert re.fullmatch(r"wh_[a-z0-9]{12,}", body["id"])
    assert re.fullmatch(r"whsec_test_[a-z0-9]{40}", body["secret"])
    assert body["url"] == HOOK
    assert body["events"] == ["compliance.warning", "document.uploaded"]
    assert body["active"] is True
    assert body["description"] == "ops"
    assert TIMESTAMP.match(body["createdAt"])
    assert body["createdAt"] == body["updatedAt"]
    assert body["previousSecretExpiresAt"] is body["disabledReason"] is body["disabledAt"] is None


async def test_live_key_gets_a_live_secret(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount
) -> None:
    live = Client(http, api, (await make_account(mode="live")).key)
    created = await live.create(HOOK)
    assert created["secret"].startswith("whsec_live_")


async def test_get_never_shows_the_secret(client: Client) -> None:
    created = await client.create(HOOK, active=False)
    status, body, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    assert status == 200
    assert "secret" not in body
    assert body == {k: v for k, v in created.items() if k != "secret"}
    assert body["active"] is False


async def test_list_is_newest_first_with_envelope(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount
) -> None:
    client = Client(http, api, (await make_account()).key)
    ids = [(await client.create(f"{HOOK}/{n}"))["id"] for n in range(3)]
    status, body, _ = await client.call("GET", "/api/v1/webhooks")
    assert status == 200
    assert body["offset"] == 0
    assert body["limit"] == 20
    assert body["total"] == 3
    assert [w["id"] for w in body["data"]] == ids[::-1]
    assert all("secret" not in w for w in body["data"])

    status, body, _ = await client.call(
        "GET", "/api/v1/webhooks", params={"offset": "1", "limit": "1"}
    )
    assert (status, body["offset"], body["limit"], body["total"]) == (200, 1, 1, 3)
    assert [w["id"] for w in body["data"]] == [ids[1]]

    status, body, _ = await client.call("GET", "/api/v1/webhooks", params={"offset": "50"})
    assert (status, body["data"], body["total"]) == (200, [], 3)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "abc"}, "offset"),
        ({"offset": "99999999999999999999"}, "offset"),
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/webhooks", "/api/v1/webhooks/{id}/deliveries"])
async def test_bad_pagination_is_400_naming_the_parameter(
    client: Client, params: dict[str, str], field: str, path: str
) -> None:
    if "{id}" in path:
        path = path.format(id=(await client.create(HOOK))["id"])
    status, body, _ = await client.call("GET", path, params=params)
    assert status == 400
    assert_error(body, "invalid_pagination", field)


async def test_limit_bounds_are_accepted(client: Client) -> None:
    for limit in ("1", "100"):
        status, body, _ = await client.call("GET", "/api/v1/webhooks", params={"limit": limit})
        assert (status, body["limit"]) == (200, int(limit))


async def test_put_updates_only_the_given_fields(client: Client) -> None:
    created = await client.create(HOOK, ["document.uploaded"], description="first")
    await asyncio.sleep(0.002)  # so updatedAt can differ at millisecond precision
    status, body, _ = await client.call(
        "PUT", f"/api/v1/webhooks/{created['id']}", json={"active": False}
    )
    assert status == 200
    assert body["active"] is False
    assert body["url"] == HOOK
    assert body["events"] == ["document.uploaded"]
    assert body["description"] == "first"
    assert body["createdAt"] == created["createdAt"]
    assert datetime.fromisoformat(body["updatedAt"]) > datetime.fromisoformat(created["updatedAt"])
    assert "secret" not in body

    status, body, _ = await client.call(
        "PUT",
        f"/api/v1/webhooks/{created['id']}",
        json={
            "url": "https://example.org/other",
            "events": ["document.batch_downloaded"],
            "description": None,
        },
    )
    assert status == 200
    assert body["url"] == "https://example.org/other"
    assert body["events"] == ["document.batch_downloaded"]
    assert body["description"] is None
    assert body["active"] is False

    status, got, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    assert got == body


async def test_put_with_empty_object_changes_nothing(client: Client) -> None:
    created = await client.create(HOOK)
    status, body, _ = await client.call("PUT", f"/api/v1/webhooks/{created['id']}", json={})
    assert status == 200
    assert body == {k: v for k, v in created.items() if k != "secret"}


@pytest.mark.parametrize("field", ["url", "events", "active"])
async def test_put_null_for_a_required_field_is_400(client: Client, field: str) -> None:
    created = await client.create(HOOK)
    status, body, _ = await client.call(
        "PUT", f"/api/v1/webhooks/{created['id']}", json={field: None}
    )
    assert status == 400
    assert_error(body, "invalid_type", field)


async def test_delete_then_everything_is_404(client: Client) -> None:
    created = await client.create(HOOK)
    wid = created["id"]
    status, body, _ = await client.call("DELETE", f"/api/v1/webhooks/{wid}")
    assert (status, body) == (204, None)
    for method, path, payload in [
        ("GET", f"/api/v1/webhooks/{wid}", None),
        ("PUT", f"/api/v1/webhooks/{wid}", {"active": True}),
        ("DELETE", f"/api/v1/webhooks/{wid}", None),
        ("POST", f"/api/v1/webhooks/{wid}/test", None),
        ("GET", f"/api/v1/webhooks/{wid}/deliveries", None),
    ]:
        status, body, _ = await client.call(method, path, json=payload)
        assert status == 404, (method, path)
        assert_error(body, "not_found")
    status, body, _ = await client.call("GET", "/api/v1/webhooks")
    assert wid not in [w["id"] for w in body["data"]]


async def test_unknown_and_malformed_ids_are_404(client: Client) -> None:
    for wid in ("wh_000000000000", "wh_x", "nope", "WH_AAAAAAAAAAAAAA"):
        status, body, _ = await client.call("GET", f"/api/v1/webhooks/{wid}")
        assert status == 404
        assert_error(body, "not_found")


async def test_isolation_across_accounts_and_modes_is_404(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    owner = await make_account()
    mine = Client(http, api, owner.key)
    created = await mine.create(HOOK)
    wid = created["id"]

    other = Client(http, api, (await make_account()).key)
    # The same account's live key sees only live webhooks.
    async with pool.acquire() as conn:
        from engine.store.accounts import create_key

        issued = await create_key(conn, account_id=owner.id, mode="live")
    assert issued is not None and issued.api_key.startswith("sk_live_")
    live = Client(http, api, issued.api_key)

    for stranger in (other, live):
        for method, path, payload in [
            ("GET", f"/api/v1/webhooks/{wid}", None),
            ("PUT", f"/api/v1/webhooks/{wid}", {"active": False}),
            ("DELETE", f"/api/v1/webhooks/{wid}", None),
            ("POST", f"/api/v1/webhooks/{wid}/test", None),
            ("GET", f"/api/v1/webhooks/{wid}/deliveries", None),
        ]:
            status, body, _ = await stranger.call(method, path, json=payload)
            assert status == 404, (method, path)
            assert_error(body, "not_found")
        status, body, _ = await stranger.call("GET", "/api/v1/webhooks")
        assert wid not in [w["id"] for w in body["data"]]

    # Untouched by the attempts above.
    status, body, _ = await mine.call("GET", f"/api/v1/webhooks/{wid}")
    assert status == 200
    assert body["active"] is True


async def test_missing_or_unknown_key_is_401(http: aiohttp.ClientSession, api: str) -> None:
    for key in (None, "", "sk_test_" + "a" * 40, "sk_live_nope", "garbage", "Bearer x"):
        anon = Client(http, api, None)
        headers = {"X-API-Key": key} if key is not None else {}
        for method, path in [
            ("GET", "/api/v1/webhooks"),
            ("POST", "/api/v1/webhooks"),
            ("GET", "/api/v1/webhooks/wh_000000000000"),
            ("DELETE", "/api/v1/webhooks/wh_000000000000"),
        ]:
            status, body, _ = await anon.call(method, path, headers=headers, data=b"{")
            assert status == 401, (key, method, path)
            assert_error(body, "unauthorized")


async def test_plan_gating_is_403_before_anything_else(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount
) -> None:
    starter = Client(http, api, (await make_account(plan="starter")).key)
    for method, path, payload in [
        ("GET", "/api/v1/webhooks", None),
        ("POST", "/api/v1/webhooks", {"url": HOOK, "events": ["document.uploaded"]}),
        ("POST", "/api/v1/webhooks", {"bogus": 1}),
        ("GET", "/api/v1/webhooks/wh_000000000000", None),
    ]:
        status, body, _ = await starter.call(method, path, json=payload)
        assert status == 403
        assert_error(body, "plan_required")
        assert body["error"]["message"] == (
            "Webhook access is available on Business and Enterprise plans"
        )
    enterprise = Client(http, api, (await make_account(plan="enterprise")).key)
    status, _, _ = await enterprise.call("GET", "/api/v1/webhooks")
    assert status == 200


GOOD = {"url": HOOK, "events": ["document.uploaded"]}


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        ([], "invalid_body", None),
        ("text", "invalid_body", None),
        ({"events": ["document.uploaded"]}, "missing_field", "url"),
        ({"url": HOOK}, "missing_field", "events"),
        ({**GOOD, "secret": "mine"}, "unknown_field", "secret"),
        ({**GOOD, "Url": HOOK}, "unknown_field", "Url"),
        ({**GOOD, "url": 5}, "invalid_type", "url"),
        ({**GOOD, "url": None}, "invalid_type", "url"),
        ({**GOOD, "events": "document.uploaded"}, "invalid_type", "events"),
        ({**GOOD, "events": [1]}, "invalid_type", "events"),
        ({**GOOD, "events": []}, "invalid_events", "events"),
        ({**GOOD, "events": ["document.deleted"]}, "unknown_event_type", "events"),
        (
            {**GOOD, "events": ["document.uploaded", "document.uploaded"]},
            "invalid_events",
            "events",
        ),
        ({**GOOD, "active": "yes"}, "invalid_type", "active"),
        ({**GOOD, "active": 1}, "invalid_type", "active"),
        ({**GOOD, "active": None}, "invalid_type", "active"),
        ({**GOOD, "description": 7}, "invalid_type", "description"),
        ({**GOOD, "description": "x" * 256}, "invalid_value", "description"),
        ({**GOOD, "description": "a\x00b"}, "invalid_value", "description"),
        ({**GOOD, "url": "http://example.com/hook"}, "invalid_url", "url"),
        ({**GOOD, "url": "ftp://example.com/hook"}, "invalid_url", "url"),
        ({**GOOD, "url": "/relative"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://user:pw@example.com/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://example.com/#frag"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://example.com/" + "a" * 2048}, "invalid_url", "url"),
        ({**GOOD, "url": "https://exa mple.com/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://example.com:99999/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://a..b/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://./"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://exa<mple.com/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://" + "a" * 70 + ".com/"}, "invalid_url", "url"),
        ({**GOOD, "url": "https://10.0.0.1/hook"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://169.254.169.254/latest"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://[::ffff:10.0.0.1]/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://192.168.1.1/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://100.64.0.1/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://0.0.0.0/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://224.0.0.1/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://0xa.1/"}, "url_not_allowed", "url"),
        ({**GOOD, "url": "https://167772161/"}, "url_not_allowed", "url"),
    ],
)
async def test_invalid_create_is_400(client: Client, payload: Any, code: str, field: str) -> None:
    status, body, _ = await client.call("POST", "/api/v1/webhooks", json=payload)
    assert status == 400, body
    assert_error(body, code, field)
    status, listing, _ = await client.call("GET", "/api/v1/webhooks")
    assert listing["total"] == 0


async def test_invalid_update_is_400_and_changes_nothing(client: Client) -> None:
    created = await client.create(HOOK)
    path = f"/api/v1/webhooks/{created['id']}"
    for payload, code, field in [
        ({"url": "https://10.0.0.1/"}, "url_not_allowed", "url"),
        ({"events": []}, "invalid_events", "events"),
        ({"active": False, "color": "red"}, "unknown_field", "color"),
        ({"description": "x" * 256}, "invalid_value", "description"),
    ]:
        status, body, _ = await client.call("PUT", path, json=payload)
        assert status == 400
        assert_error(body, code, field)
    status, body, _ = await client.call("GET", path)
    assert body == {k: v for k, v in created.items() if k != "secret"}


async def test_description_of_255_characters_is_accepted(client: Client) -> None:
    created = await client.create(HOOK, description="é" * 255)
    assert created["description"] == "é" * 255


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"   ", b"nul", b'{"url": "x",}', b"\xff\xfe", b'"\\ud800"', b"[1,2"],
)
async def test_malformed_json_is_400(client: Client, raw: bytes) -> None:
    status, body, _ = await client.call(
        "POST", "/api/v1/webhooks", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert_error(body, "invalid_json")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
async def test_wrong_content_type_is_415(client: Client, content_type: str | None) -> None:
    created = await client.create(HOOK)
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in [
        ("POST", "/api/v1/webhooks"),
        ("PUT", f"/api/v1/webhooks/{created['id']}"),
    ]:
        status, body, _ = await client.call(
            method, path, data=b'{"url": "https://example.com/"}', headers=headers
        )
        assert status == 415
        assert_error(body, "unsupported_media_type")


async def test_json_with_charset_is_accepted(client: Client) -> None:
    status, _, _ = await client.call(
        "POST",
        "/api/v1/webhooks",
        data=b'{"url": "https://example.com/a", "events": ["document.uploaded"]}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201


async def test_body_over_64_kib_is_413(client: Client) -> None:
    big = b'{"url": "https://example.com/", "description": "' + b"x" * (64 * 1024) + b'"}'
    status, body, _ = await client.call(
        "POST", "/api/v1/webhooks", data=big, headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert_error(body, "payload_too_large")

    async def chunks() -> Any:  # no Content-Length: the size is counted as it streams
        for _ in range(80):
            yield b" " * 1024

    status, body, _ = await client.call(
        "POST", "/api/v1/webhooks", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert_error(body, "payload_too_large")


async def test_body_of_exactly_64_kib_is_read(client: Client) -> None:
    payload = b'{"url": "https://example.com/", "events": ["document.uploaded"]}'
    raw = payload + b" " * (64 * 1024 - len(payload))
    status, body, _ = await client.call(
        "POST", "/api/v1/webhooks", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 201, body


async def test_unknown_path_and_wrong_method_are_json(client: Client) -> None:
    status, body, _ = await client.call("GET", "/api/v1/nothing")
    assert status == 404
    assert_error(body, "not_found")
    status, body, _ = await client.call("GET", "/elsewhere")
    assert status == 404
    assert_error(body, "not_found")
    for method, path in [
        ("PATCH", "/api/v1/webhooks"),
        ("DELETE", "/api/v1/webhooks"),
        ("PATCH", "/api/v1/webhooks/wh_000000000000"),
        ("GET", "/api/v1/webhooks/wh_000000000000/test"),
    ]:
        status, body, headers = await client.call(method, path)
        assert status == 405, (method, path)
        assert_error(body, "method_not_allowed")
        assert "Allow" in headers


async def test_webhook_cap_is_409(
    http: aiohttp.ClientSession, api_settings: Settings, pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
) -> None:  # fmt: skip
    runner, base = await start_api(with_(api_settings, max_webhooks_per_account=2), pool)
    try:
        client = Client(http, base, (await make_account()).key)
        first = await client.create(HOOK)
        await client.create(HOOK)
        status, body, _ = await client.call("POST", "/api/v1/webhooks", json=GOOD)
        assert status == 409
        assert_error(body, "webhook_limit_reached")
        # Deleted webhooks do not count.
        status, _, _ = await client.call("DELETE", f"/api/v1/webhooks/{first['id']}")
        assert status == 204
        await client.create(HOOK)
    finally:
        await runner.cleanup()


async def test_every_change_sends_notify(client: Client, database_url: str) -> None:
    listener = await connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, channel: str, payload: object) -> None:
        assert channel == NOTIFY_CHANNEL
        assert isinstance(payload, str)
        received.put_nowait(payload)

    await listener.add_listener(NOTIFY_CHANNEL, on_notify)
    try:
        created = await client.create(HOOK)
        wid = created["id"]
        assert await asyncio.wait_for(received.get(), 5) == wid
        await client.call("PUT", f"/api/v1/webhooks/{wid}", json={"active": False})
        assert await asyncio.wait_for(received.get(), 5) == wid
        await client.call("DELETE", f"/api/v1/webhooks/{wid}")
        assert await asyncio.wait_for(received.get(), 5) == wid
        # A failed change sends nothing.
        await client.call("PUT", f"/api/v1/webhooks/{wid}", json={"active": True})
        await client.call("GET", "/api/v1/webhooks")
        await asyncio.sleep(0.2)
        assert received.empty()
    finally:
        await listener.close()


async def test_key_is_stored_only_as_a_hash(account: Account, pool: asyncpg.Pool[Any]) -> None:
    rows = await pool.fetch(
        "SELECT key_hash, key_prefix FROM api_keys WHERE account_id = $1", account.id
    )
    assert len(rows) == 1
    import hashlib

    assert bytes(rows[0]["key_hash"]) == hashlib.sha256(account.key.encode()).digest()
    assert account.key not in str(dict(rows[0]))
    assert len(rows[0]["key_prefix"]) < 20

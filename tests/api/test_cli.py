"""`accounts create`, `keys create` and `migrate` as an operator runs them, against the API."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import aiohttp
import orjson
import pytest

from tests.api.conftest import Client
from tests.api.test_webhooks import TIMESTAMP


async def run_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        env={**os.environ, "CARGOLINT_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_accounts_and_keys_from_the_command_line(
    database_url: str, api: str, http: aiohttp.ClientSession
) -> None:
    code, out, err = await run_cli(
        database_url, "accounts", "create", "--name", "Acme Freight", "--plan", "business"
    )
    assert code == 0, err
    created: dict[str, Any] = orjson.loads(out)
    assert set(created) == {"accountId", "keyId", "apiKey"}
    # As the contract shows it, with the key's id: one line, the stdlib's spacing.
    assert out == (
        f'{{"accountId": "{created["accountId"]}", "keyId": "{created["keyId"]}", '
        f'"apiKey": "{created["apiKey"]}"}}\n'
    )
    assert created["accountId"].startswith("acct_")
    assert created["keyId"].startswith("key_")
    assert created["apiKey"].startswith("sk_test_")  # mode defaults to test
    assert len(created["apiKey"]) >= len("sk_test_") + 32
    assert created["apiKey"] not in err

    code, out, err = await run_cli(
        database_url, "keys", "create", "--account", created["accountId"], "--mode", "live"
    )
    assert code == 0, err
    key: dict[str, Any] = orjson.loads(out)
    assert out == (
        f'{{"accountId": "{key["accountId"]}", "keyId": "{key["keyId"]}", '
        f'"apiKey": "{key["apiKey"]}"}}\n'
    )
    assert key["keyId"].startswith("key_") and key["keyId"] != created["keyId"]
    assert key["accountId"] == created["accountId"]
    assert key["apiKey"].startswith("sk_live_")

    # The keys work, each in its own mode.
    test_client = Client(http, api, created["apiKey"])
    live_client = Client(http, api, key["apiKey"])
    hook = await test_client.create("https://example.com/cli")
    assert hook["secret"].startswith("whsec_test_")
    status, _, _ = await live_client.call("GET", f"/api/v1/webhooks/{hook['id']}")
    assert status == 404
    status, body, _ = await live_client.call("GET", "/api/v1/webhooks")
    assert (status, body["total"]) == (200, 0)


@pytest.mark.parametrize("plan", ["free", "Pro"])
async def test_any_other_plan_can_be_created_and_is_refused_by_the_api(
    database_url: str, api: str, http: aiohttp.ClientSession, plan: str
) -> None:
    # The contract names only the plans with webhooks: whatever the others are called, an
    # operator can create such an account, and its key gets 403 plan_required.
    code, out, err = await run_cli(
        database_url, "accounts", "create", "--name", "Other", "--plan", plan
    )
    assert code == 0, err
    # A typo of `business` would look just like this: the operator is told.
    assert f"plan {plan.lower()!r} has no webhook access" in err
    created = orjson.loads(out)
    status, body, _ = await Client(http, api, created["apiKey"]).call("GET", "/api/v1/webhooks")
    assert (status, body["error"]["code"]) == (403, "plan_required")


async def test_starter_account_key_is_refused_by_the_api(
    database_url: str, api: str, http: aiohttp.ClientSession
) -> None:
    code, out, _ = await run_cli(
        database_url, "accounts", "create", "--name", "Small", "--plan", "starter", "--mode", "live"
    )
    assert code == 0
    created = orjson.loads(out)
    assert created["apiKey"].startswith("sk_live_")
    status, body, _ = await Client(http, api, created["apiKey"]).call("GET", "/api/v1/webhooks")
    assert (status, body["error"]["code"]) == (403, "plan_required")


@pytest.mark.slow
async def test_keys_list_and_revoke(
    database_url: str, api: str, http: aiohttp.ClientSession
) -> None:
    code, out, err = await run_cli(
        database_url, "accounts", "create", "--name", "Keys", "--plan", "enterprise"
    )
    assert code == 0, err
    first = orjson.loads(out)
    code, out, err = await run_cli(
        database_url, "keys", "create", "--account", first["accountId"], "--mode", "live"
    )
    assert code == 0, err
    second = orjson.loads(out)

    code, out, err = await run_cli(database_url, "keys", "list", "--account", first["accountId"])
    assert code == 0, err
    listed = orjson.loads(out)
    assert [k["keyId"] for k in listed] == [first["keyId"], second["keyId"]]
    assert [k["mode"] for k in listed] == ["test", "live"]
    for key in listed:
        assert set(key) == {"keyId", "mode", "createdAt", "revokedAt"}
        assert TIMESTAMP.match(key["createdAt"])
        assert key["revokedAt"] is None
    # Never the key, nor anything of it.
    assert first["apiKey"] not in out and first["apiKey"][8:16] not in out
    assert second["apiKey"][8:16] not in out

    code, out, err = await run_cli(database_url, "keys", "revoke", second["keyId"])
    assert code == 0, err
    revoked = orjson.loads(out)
    assert revoked["keyId"] == second["keyId"]
    assert TIMESTAMP.match(revoked["revokedAt"])
    live = Client(http, api, second["apiKey"])
    status, body, _ = await live.call("GET", "/api/v1/webhooks")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, _, _ = await Client(http, api, first["apiKey"]).call("GET", "/api/v1/webhooks")
    assert status == 200

    # Revoking again changes nothing; the listing shows when.
    code, out, _ = await run_cli(database_url, "keys", "revoke", second["keyId"])
    assert (code, orjson.loads(out)["revokedAt"]) == (0, revoked["revokedAt"])
    code, out, _ = await run_cli(database_url, "keys", "list", "--account", first["accountId"])
    assert [k["revokedAt"] for k in orjson.loads(out)] == [None, revoked["revokedAt"]]


@pytest.mark.slow
async def test_cli_errors(database_url: str) -> None:
    code, out, err = await run_cli(database_url, "keys", "create", "--account", "acct_missing")
    assert (code, out) == (1, "")
    assert "acct_missing does not exist" in err
    code, out, err = await run_cli(database_url, "keys", "list", "--account", "acct_missing")
    assert (code, out) == (1, "")
    assert "acct_missing does not exist" in err
    code, out, err = await run_cli(database_url, "keys", "revoke", "key_missing")
    assert (code, out) == (1, "")
    assert "key_missing does not exist" in err
    code, _, err = await run_cli(database_url, "keys", "revoke")
    assert code == 2
    code, _, err = await run_cli(
        database_url, "accounts", "create", "--name", "X", "--plan", "gold plated"
    )
    assert code == 2
    assert "invalid plan" in err


async def test_migrate_is_idempotent(database_url: str) -> None:
    code, out, err = await run_cli(database_url, "migrate")
    assert code == 0, err
    assert orjson.loads(out) == {"applied": []}

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


async def test_accounts_and_keys_from_the_command_line(
    database_url: str, api: str, http: aiohttp.ClientSession
) -> None:
    code, out, err = await run_cli(
        database_url, "accounts", "create", "--name", "Acme Freight", "--plan", "business"
    )
    assert code == 0, err
    created: dict[str, Any] = orjson.loads(out)
    assert set(created) == {"accountId", "apiKey"}
    # Exactly as the contract shows it: one line, the keys in this order, the stdlib's spacing.
    assert out == f'{{"accountId": "{created["accountId"]}", "apiKey": "{created["apiKey"]}"}}\n'
    assert created["accountId"].startswith("acct_")
    assert created["apiKey"].startswith("sk_test_")  # mode defaults to test
    assert len(created["apiKey"]) >= len("sk_test_") + 32
    assert created["apiKey"] not in err

    code, out, err = await run_cli(
        database_url, "keys", "create", "--account", created["accountId"], "--mode", "live"
    )
    assert code == 0, err
    key: dict[str, Any] = orjson.loads(out)
    assert out == f'{{"accountId": "{key["accountId"]}", "apiKey": "{key["apiKey"]}"}}\n'
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


async def test_cli_errors(database_url: str) -> None:
    code, out, err = await run_cli(database_url, "keys", "create", "--account", "acct_missing")
    assert (code, out) == (1, "")
    assert "acct_missing does not exist" in err
    code, _, err = await run_cli(
        database_url, "accounts", "create", "--name", "X", "--plan", "gold plated"
    )
    assert code == 2
    assert "invalid plan" in err


async def test_migrate_is_idempotent(database_url: str) -> None:
    code, out, err = await run_cli(database_url, "migrate")
    assert code == 0, err
    assert orjson.loads(out) == {"applied": []}

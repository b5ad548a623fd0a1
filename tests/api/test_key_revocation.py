"""A revoked key is refused by every API replica at once: keys are looked up on every request."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg

from engine.settings import Settings
from engine.store.accounts import create_key, revoke_key
from tests.api.conftest import Client, MakeAccount, start_api
from tests.api.test_webhooks import assert_error


async def test_a_revoked_key_gets_401_on_every_replica_at_once(
    http: aiohttp.ClientSession,
    api_settings: Settings,
    make_account: MakeAccount,
    pool: asyncpg.Pool[Any],
) -> None:
    account = await make_account()
    spare = await create_key(pool, account_id=account.id, mode="test")
    assert spare is not None
    # Two replicas, each with its own database pool, as two processes would have.
    replicas = [await start_api(api_settings, None) for _ in range(2)]
    try:
        for _, base in replicas:
            # Warm: each replica has served this key before the revocation.
            for _ in range(3):
                status, _, _ = await Client(http, base, account.key).call("GET", "/api/v1/webhooks")
                assert status == 200
        key_id = await pool.fetchval(
            "SELECT id FROM api_keys WHERE account_id = $1 ORDER BY created_at LIMIT 1",
            account.id,
        )
        assert await revoke_key(pool, key_id) is not None
        # The very next request on each replica, with no wait.
        for _, base in replicas:
            status, body, _ = await Client(http, base, account.key).call("GET", "/api/v1/webhooks")
            assert status == 401
            assert_error(body, "unauthorized")
            status, _, _ = await Client(http, base, spare.api_key).call("GET", "/api/v1/webhooks")
            assert status == 200  # the account's other key still works
    finally:
        for runner, _ in replicas:
            await runner.cleanup()

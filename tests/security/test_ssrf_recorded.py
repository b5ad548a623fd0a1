"""Every connection-time refusal is recorded on the attempt, by the real worker and the API.

The webhooks are written straight into the database, as if their host had resolved to a
public address at creation and to loopback later (DNS rebinding), so only the connection-time
check stands between the worker and the receiver.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg
import pytest

from engine.core.crypto import SecretBox
from engine.store.accounts import create_account
from engine.store.migrate import migrate
from engine.store.webhooks import create_webhook
from tests.chaos.harness import Proc, engine_env, free_port, make_event, publish, wait_until
from tests.receiver import Receiver


@pytest.mark.slow
async def test_refusals_are_recorded_and_nothing_reaches_the_receiver(
    private_database_url: str, amqp_url: str, ca_file: Path, receiver: Receiver, tmp_path: Path
) -> None:
    url = private_database_url
    await migrate(url)
    targets = [
        receiver.url + "/direct",  # https://127.0.0.1:port
        receiver.url.replace("127.0.0.1", "localhost") + "/by-name",
        receiver.url.replace("127.0.0.1", "0x7f.1") + "/odd",
        receiver.url.replace("127.0.0.1", "[::ffff:127.0.0.1]") + "/mapped",
    ]
    conn = await asyncpg.connect(url)
    try:
        account, api_key = await create_account(conn, name="Ssrf", plan="business", mode="test")
        webhook_ids = []
        for target in targets:
            row, _ = await create_webhook(
                conn,
                account_id=account,
                mode="test",
                url=target,
                events=["document.uploaded"],
                active=True,
                description=None,
                box=SecretBox(()),
                limit=10,
            )
            webhook_ids.append(row["id"])
    finally:
        await conn.close()

    api_port = free_port()
    env = engine_env(
        database_url=url,
        amqp_url=amqp_url,
        ca_file=ca_file,
        api_port=str(api_port),
        retry_schedule="100ms",
        delivery_timeout="5",
    )
    env["CARGOLINT_ALLOWED_NETWORKS"] = ""  # production: nothing private allowed
    worker = Proc("worker", ["worker"], env, tmp_path).start()
    api = Proc("api", ["api"], env, tmp_path).start()
    try:
        await worker.ready()
        await api.wait_http(f"http://127.0.0.1:{api_port}/healthz")
        await publish(amqp_url, [make_event(1, account, run="ssrf")])

        async def all_failed() -> bool:
            c = await asyncpg.connect(url)
            try:
                n = await c.fetchval(
                    "SELECT count(*) FROM deliveries WHERE status = 'failed' AND NOT is_test"
                )
            finally:
                await c.close()
            return int(n) == len(targets)

        await wait_until(all_failed, timeout=30, what="every delivery to end failed")

        # The API's test delivery goes through the same check.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{api_port}/api/v1/webhooks/{webhook_ids[1]}/test",
                headers={"X-API-Key": api_key},
            ) as response,
        ):
            assert response.status == 200
            record = await response.json()
    finally:
        assert await worker.terminate() == 0
        assert await api.terminate() == 0

    assert record["status"] == "failed"
    assert "not allowed" in record["error"]
    assert "127.0.0.1" not in record["error"]
    assert receiver.requests == []

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT d.webhook_id, a.number, a.error_class, a.error, a.response_status
               FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
               WHERE NOT d.is_test ORDER BY d.webhook_id, a.number"""
        )
        errors = await conn.fetch("SELECT error FROM deliveries WHERE NOT is_test")
    finally:
        await conn.close()
    assert {r["webhook_id"] for r in rows} == set(webhook_ids)
    for row in rows:
        assert row["error_class"] == "blocked_address", dict(row)
        assert row["response_status"] is None
        assert "not allowed" in row["error"]
        assert "loopback address" in row["error"], row["error"]
        # What the names resolved to is not the customer's to see (docs/contract.md §7).
        assert "127.0.0.1" not in row["error"], row["error"]
        assert "7f00:1" not in row["error"], row["error"]
    assert all("not allowed" in r["error"] for r in errors)

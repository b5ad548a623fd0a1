"""POST /webhooks/{id}/rotate-secret, and the webhook fields of API 1.1 on every response."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from cryptography.fernet import Fernet

from engine.core.crypto import SecretBox
from engine.settings import Settings
from engine.store.db import NOTIFY_CHANNEL, connect
from tests.api.conftest import Account, Client, MakeAccount, start_api
from tests.api.test_test_delivery import contract_verify
from tests.api.test_webhooks import HOOK, TIMESTAMP, assert_error
from tests.conftest import with_
from tests.receiver import Receiver


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


async def _rotate(client: Client, webhook_id: str, body: Any = None) -> tuple[int, Any]:
    status, answer, _ = await client.call(
        "POST", f"/api/v1/webhooks/{webhook_id}/rotate-secret", json=body
    )
    return status, answer


async def test_rotation_returns_a_new_secret_once_and_the_overlaps_end(client: Client) -> None:
    created = await client.create(HOOK)
    before = datetime.now(UTC)
    status, rotated = await _rotate(client, created["id"])
    assert status == 200
    assert set(rotated) == set(created)
    assert rotated["secret"].startswith("whsec_test_") and len(rotated["secret"]) >= 43
    assert rotated["secret"] != created["secret"]
    assert TIMESTAMP.match(rotated["previousSecretExpiresAt"])
    expires = _parse(rotated["previousSecretExpiresAt"])
    # The default overlap is a day.
    assert before + timedelta(seconds=86_399) < expires < before + timedelta(seconds=86_460)
    assert rotated["updatedAt"] >= created["updatedAt"]

    status, shown, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    assert status == 200
    assert "secret" not in shown
    assert shown["previousSecretExpiresAt"] == rotated["previousSecretExpiresAt"]
    status, listing, _ = await client.call("GET", "/api/v1/webhooks")
    assert listing["data"][0]["previousSecretExpiresAt"] == rotated["previousSecretExpiresAt"]


@pytest.mark.parametrize(
    ("overlap", "seconds"), [(0, None), (1, 1), (604_800, 604_800), (60.0, 60)]
)
async def test_the_overlap_can_be_chosen(
    client: Client, pool: asyncpg.Pool[Any], overlap: float, seconds: int | None
) -> None:
    created = await client.create(HOOK)
    status, rotated = await _rotate(client, created["id"], {"overlapSeconds": overlap})
    assert status == 200, rotated
    row = await pool.fetchrow(
        """SELECT previous_secret, previous_secret_expires_at - updated_at AS overlap
           FROM webhooks WHERE id = $1""",
        created["id"],
    )
    assert row is not None
    if seconds is None:
        assert rotated["previousSecretExpiresAt"] is None
        assert (row["previous_secret"], row["overlap"]) == (None, None)
    else:
        assert rotated["previousSecretExpiresAt"] is not None
        assert row["overlap"] == timedelta(seconds=seconds)
        assert SecretBox(()).open(row["previous_secret"]) == created["secret"]


async def test_the_expiry_is_shown_only_while_the_previous_secret_signs(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    await _rotate(client, created["id"])
    await pool.execute(
        "UPDATE webhooks SET previous_secret_expires_at = now() - interval '1 ms' WHERE id = $1",
        created["id"],
    )
    status, shown, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    assert (status, shown["previousSecretExpiresAt"]) == (200, None)


async def test_test_deliveries_are_signed_with_both_secrets_during_the_overlap(
    client: Client, receiver: Receiver
) -> None:
    created = await client.create(f"{receiver.url}/hook")
    _, first = await _rotate(client, created["id"])
    _, record, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    assert record["status"] == "succeeded"
    request = receiver.requests[-1]
    body = request.body.decode()
    # Receivers that have not switched verify the usual header with the secret they hold.
    assert contract_verify(created["secret"], body, request.headers["X-CargoLint-Signature"])
    assert contract_verify(first["secret"], body, request.headers["X-CargoLint-Signature-Next"])

    # A rotation during the overlap drops the oldest secret: the one it replaces signs now.
    _, second = await _rotate(client, created["id"], {"overlapSeconds": 3600})
    await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    request = receiver.requests[-1]
    body = request.body.decode()
    assert contract_verify(first["secret"], body, request.headers["X-CargoLint-Signature"])
    assert contract_verify(second["secret"], body, request.headers["X-CargoLint-Signature-Next"])

    # Overlap 0: the new secret signs alone, at once.
    _, third = await _rotate(client, created["id"], {"overlapSeconds": 0})
    await client.call("POST", f"/api/v1/webhooks/{created['id']}/test")
    request = receiver.requests[-1]
    assert contract_verify(
        third["secret"], request.body.decode(), request.headers["X-CargoLint-Signature"]
    )
    assert "X-CargoLint-Signature-Next" not in request.headers


async def test_both_secrets_are_encrypted_at_rest(
    http: aiohttp.ClientSession,
    api_settings: Settings,
    pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
) -> None:
    settings = with_(api_settings, secret_keys=(Fernet.generate_key().decode(),))
    runner, base = await start_api(settings, pool)
    try:
        client = Client(http, base, (await make_account()).key)
        created = await client.create(HOOK)
        _, rotated = await _rotate(client, created["id"])
        row = await pool.fetchrow(
            "SELECT secret, previous_secret FROM webhooks WHERE id = $1", created["id"]
        )
        assert row is not None
        assert row["secret"].startswith("fernet:") and row["previous_secret"].startswith("fernet:")
        assert rotated["secret"] not in row["secret"]
        assert created["secret"] not in row["previous_secret"]
        box = SecretBox(settings.secret_keys)
        assert box.open(row["secret"]) == rotated["secret"]
        assert box.open(row["previous_secret"]) == created["secret"]
    finally:
        await runner.cleanup()


async def test_rotation_notifies_the_workers(client: Client, database_url: str) -> None:
    created = await client.create(HOOK)
    listener = await connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(
        NOTIFY_CHANNEL, lambda _c, _p, _ch, payload: received.put_nowait(str(payload))
    )
    try:
        await _rotate(client, created["id"])
        assert await asyncio.wait_for(received.get(), 5) == created["id"]
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"overlapSeconds": -1}, "invalid_value", "overlapSeconds"),
        ({"overlapSeconds": 604_801}, "invalid_value", "overlapSeconds"),
        ({"overlapSeconds": 10**30}, "invalid_value", "overlapSeconds"),
        ({"overlapSeconds": True}, "invalid_type", "overlapSeconds"),
        ({"overlapSeconds": False}, "invalid_type", "overlapSeconds"),
        ({"overlapSeconds": "60"}, "invalid_type", "overlapSeconds"),
        ({"overlapSeconds": 1.5}, "invalid_type", "overlapSeconds"),
        ({"overlapSeconds": None}, "invalid_type", "overlapSeconds"),
        ({"overlapSeconds": 60, "secret": "mine"}, "unknown_field", "secret"),
        ({"overlap": 60}, "unknown_field", "overlap"),
        ([60], "invalid_body", None),
    ],
)
async def test_a_bad_rotation_is_400_and_changes_nothing(
    client: Client, pool: asyncpg.Pool[Any], body: Any, code: str, field: str | None
) -> None:
    created = await client.create(HOOK)
    stored = await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", created["id"])
    status, answer = await _rotate(client, created["id"], body)
    assert status == 400
    assert_error(answer, code, field)
    assert await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", created["id"]) == stored


async def test_rotation_without_a_body_and_on_an_inactive_webhook(client: Client) -> None:
    created = await client.create(HOOK, active=False)
    for headers in ({}, {"Content-Type": "text/plain"}):
        status, rotated, _ = await client.call(
            "POST", f"/api/v1/webhooks/{created['id']}/rotate-secret", headers=headers
        )
        assert status == 200
        assert rotated["previousSecretExpiresAt"] is not None


async def test_rotating_someone_elses_or_a_deleted_webhook_is_404(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    owner = Client(http, api, (await make_account()).key)
    created, deleted = await owner.create(HOOK), await owner.create(HOOK)
    await owner.call("DELETE", f"/api/v1/webhooks/{deleted['id']}")
    stored = await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", created["id"])
    stranger = Client(http, api, (await make_account()).key)
    for client, webhook_id in [
        (stranger, created["id"]),
        (owner, deleted["id"]),
        (owner, "wh_000000000000"),
        (owner, "wh_x"),
    ]:
        status, answer = await _rotate(client, webhook_id)
        assert status == 404
        assert_error(answer, "not_found")
    assert await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", created["id"]) == stored


# Re-enabling a webhook the engine disabled.


async def _disable(pool: asyncpg.Pool[Any], webhook_id: str, reason: str) -> None:
    await pool.execute(
        """UPDATE webhooks SET active = false, disabled_reason = $2, disabled_at = now(),
                               failing_since = now() - interval '5 days'
           WHERE id = $1""",
        webhook_id,
        reason,
    )


@pytest.mark.parametrize("reason", ["failing", "gone"])
async def test_put_active_true_re_enables_and_clears_why(
    client: Client, pool: asyncpg.Pool[Any], reason: str
) -> None:
    created = await client.create(HOOK)
    await _disable(pool, created["id"], reason)
    status, shown, _ = await client.call("GET", f"/api/v1/webhooks/{created['id']}")
    assert (shown["active"], shown["disabledReason"]) == (False, reason)
    assert TIMESTAMP.match(shown["disabledAt"])

    status, updated, _ = await client.call(
        "PUT", f"/api/v1/webhooks/{created['id']}", json={"active": True}
    )
    assert status == 200
    assert (updated["active"], updated["disabledReason"], updated["disabledAt"]) == (
        True,
        None,
        None,
    )
    failing_since = await pool.fetchval(
        "SELECT failing_since FROM webhooks WHERE id = $1", created["id"]
    )
    assert failing_since is None


async def test_other_changes_leave_why_it_was_disabled(
    client: Client, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    await _disable(pool, created["id"], "gone")
    for change in ({"description": "still off"}, {"active": False}):
        status, updated, _ = await client.call(
            "PUT", f"/api/v1/webhooks/{created['id']}", json=change
        )
        assert (status, updated["active"], updated["disabledReason"]) == (200, False, "gone")


async def test_active_true_on_an_active_webhook_keeps_its_run_of_failures(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    await pool.execute(
        "UPDATE webhooks SET failing_since = now() - interval '1 day' WHERE id = $1",
        created["id"],
    )
    await client.call("PUT", f"/api/v1/webhooks/{created['id']}", json={"active": True})
    assert await pool.fetchval(
        "SELECT failing_since IS NOT NULL FROM webhooks WHERE id = $1", created["id"]
    )

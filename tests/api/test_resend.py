"""POST …/deliveries/{deliveryId}/retry and POST …/recover: back to pending, fresh schedule."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.settings import Settings
from engine.store import resending
from engine.store.endpoints import unowned_with_due_work
from tests.api.conftest import Account, Client, MakeAccount, start_api
from tests.api.deliveries import add_delivery
from tests.api.test_test_delivery import DELIVERY_KEYS
from tests.api.test_webhooks import HOOK, assert_error
from tests.conftest import with_


async def _row(pool: asyncpg.Pool[Any], dlv: str) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        """SELECT status, attempts, retry_base, claimed_by, next_attempt_at,
                  next_attempt_at <= now() AS due, created_at
           FROM deliveries WHERE id = $1""",
        dlv,
    )
    assert row is not None
    return row


@pytest.mark.parametrize("status", ["succeeded", "failed"])
async def test_an_ended_delivery_goes_back_to_pending_due_now(
    client: Client, account: Account, pool: asyncpg.Pool[Any], status: str
) -> None:
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id, status=status, attempts=8)
    before = await client.call("GET", f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}")

    code, record, _ = await client.call(
        "POST", f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}/retry"
    )
    assert code == 202, record
    assert set(record) == DELIVERY_KEYS
    assert (record["id"], record["status"], record["attempts"]) == (dlv, "pending", 8)
    assert record["nextAttemptAt"] is not None
    # The last attempt's outcome stays on the record until the next attempt.
    for field in ("responseStatus", "error", "lastAttemptAt", "createdAt", "eventId"):
        assert record[field] == before[1][field]
    row = await _row(pool, dlv)
    assert (row["status"], row["attempts"], row["retry_base"]) == ("pending", 8, 8)
    assert (row["claimed_by"], row["due"]) == (None, True)


async def test_resending_twice_is_409_delivery_pending(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id, status="failed", attempts=3)
    path = f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}/retry"
    assert (await client.call("POST", path))[0] == 202
    status, body, _ = await client.call("POST", path)
    assert status == 409
    assert_error(body, "delivery_pending")


async def test_refusals_in_their_order(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    active = await client.create(HOOK)
    inactive = await client.create(HOOK, active=False)
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (active, {"status": "pending"}, "delivery_pending"),
        (active, {"status": "failed", "attempts": 1, "is_test": True}, "not_resendable"),
        (active, {"status": "succeeded", "attempts": 1, "is_test": True}, "not_resendable"),
        # The webhook is checked first: its state decides for every one of its deliveries.
        (inactive, {"status": "failed", "attempts": 1}, "webhook_inactive"),
        (inactive, {"status": "failed", "attempts": 1, "is_test": True}, "webhook_inactive"),
        (inactive, {"status": "pending"}, "webhook_inactive"),
    ]
    for webhook, state, code in cases:
        dlv = await add_delivery(pool, webhook["id"], account.id, **state)
        before = await _row(pool, dlv)
        status, body, _ = await client.call(
            "POST", f"/api/v1/webhooks/{webhook['id']}/deliveries/{dlv}/retry"
        )
        assert status == 409, (state, body)
        assert_error(body, code)
        assert await _row(pool, dlv) == before  # untouched


async def test_a_deactivated_webhooks_ended_deliveries_resend_once_it_is_active_again(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id)  # pending
    path = f"/api/v1/webhooks/{created['id']}"
    await client.call("PUT", path, json={"active": False})  # ends it: webhook deactivated
    status, body, _ = await client.call("POST", f"{path}/deliveries/{dlv}/retry")
    assert (status, body["error"]["code"]) == (409, "webhook_inactive")
    await client.call("PUT", path, json={"active": True})
    status, record, _ = await client.call("POST", f"{path}/deliveries/{dlv}/retry")
    assert (status, record["status"]) == (202, "pending")


async def test_other_webhooks_accounts_and_modes_deliveries_are_404(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    owner = await make_account()
    mine = Client(http, api, owner.key)
    first, second = await mine.create(HOOK), await mine.create(HOOK)
    dlv = await add_delivery(pool, first["id"], owner.id, status="failed", attempts=1)
    stranger = Client(http, api, (await make_account()).key)
    for client, webhook_id, delivery in [
        (mine, second["id"], dlv),
        (stranger, first["id"], dlv),
        (mine, first["id"], "dlv_" + "0" * 24),
        (mine, first["id"], "dlv_NOPE"),
        (mine, "wh_000000000000", dlv),
    ]:
        status, body, _ = await client.call(
            "POST", f"/api/v1/webhooks/{webhook_id}/deliveries/{delivery}/retry"
        )
        assert status == 404
        assert_error(body, "not_found")
    assert (await _row(pool, dlv))["status"] == "failed"


@pytest.mark.parametrize(
    ("data", "headers", "status", "code", "field"),
    [
        (None, {}, 202, None, None),
        (None, {"Content-Type": "text/plain"}, 202, None, None),
        (None, {"Content-Type": "application/json"}, 202, None, None),
        (b"{}", {"Content-Type": "application/json"}, 202, None, None),
        (b" {} ", {"Content-Type": "application/json; charset=utf-8"}, 202, None, None),
        (b'{"force": true}', {"Content-Type": "application/json"}, 400, "unknown_field", "force"),
        (b"[]", {"Content-Type": "application/json"}, 400, "invalid_body", None),
        (b"null", {"Content-Type": "application/json"}, 400, "invalid_body", None),
        (b"{", {"Content-Type": "application/json"}, 400, "invalid_json", None),
        (b"   ", {"Content-Type": "application/json"}, 400, "invalid_json", None),
        (b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
        (b"{}", {}, 415, "unsupported_media_type", None),
    ],
)
async def test_the_body_is_empty_or_an_empty_object(
    client: Client,
    account: Account,
    pool: asyncpg.Pool[Any],
    *,
    data: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str | None,
    field: str | None,
) -> None:
    created = await client.create(HOOK)
    dlv = await add_delivery(pool, created["id"], account.id, status="failed", attempts=1)
    got, body, _ = await client.call(
        "POST",
        f"/api/v1/webhooks/{created['id']}/deliveries/{dlv}/retry",
        data=data,
        headers=headers,
    )
    assert got == status, body
    if code is not None:
        assert_error(body, code, field)
        assert (await _row(pool, dlv))["status"] == "failed"


async def test_resent_and_recovered_deliveries_are_leased_under_the_webhooks_current_endpoint(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    # Per-endpoint limits (docs/contract.md §7) are kept by the holder of the lease of the
    # endpoint a pending delivery names: after the URL moved, that must be the new endpoint.
    created = await client.create(HOOK)
    path = f"/api/v1/webhooks/{created['id']}"
    start = datetime(2026, 11, 1, tzinfo=UTC)
    resent, recovered = [
        await add_delivery(
            pool, created["id"], account.id, status="failed", attempts=8, created_at=start + n
        )
        for n in (timedelta(0), timedelta(minutes=1))
    ]
    # As the worker wrote them: under the endpoint of the URL at the time.
    await pool.execute(
        "UPDATE deliveries SET endpoint = 'https://example.com:443' WHERE id = ANY($1::text[])",
        [resent, recovered],
    )
    status, body, _ = await client.call("PUT", path, json={"url": "https://example.com:8443/a"})
    assert status == 200, body

    status, body, _ = await client.call("POST", f"{path}/deliveries/{resent}/retry")
    assert status == 202, body
    status, body, _ = await client.call(
        "POST", f"{path}/recover", json={"since": "2026-11-01T00:01:00Z"}
    )
    assert (status, body) == (202, {"recovered": 1})

    rows = await pool.fetch(
        "SELECT id, status, endpoint FROM deliveries WHERE id = ANY($1::text[])",
        [resent, recovered],
    )
    assert {(r["status"], r["endpoint"]) for r in rows} == {("pending", "https://example.com:8443")}
    # The poller finds the new endpoint without a holder, and not the old one.
    unowned = await unowned_with_due_work(pool, lease=5.0, limit=10_000)
    assert "https://example.com:8443" in unowned
    assert "https://example.com:443" not in unowned


# Recover.


async def _history(
    pool: asyncpg.Pool[Any], webhook_id: str, account_id: str, base: datetime
) -> dict[str, str]:
    """Deliveries at base + n minutes in every state a recover must tell apart."""
    states = {
        "failed_0": {"status": "failed", "attempts": 8},
        "failed_10": {"status": "failed", "attempts": 3},
        "failed_20": {"status": "failed", "attempts": 8},
        "test_failed_10": {"status": "failed", "attempts": 1, "is_test": True},
        "succeeded_10": {"status": "succeeded", "attempts": 1},
        "pending_10": {"status": "pending"},
        "failed_30": {"status": "failed", "attempts": 8},
    }
    made = {}
    for name, state in states.items():
        minutes = int(name.rsplit("_", 1)[1])
        made[name] = await add_delivery(
            pool,
            webhook_id,
            account_id,
            created_at=base + timedelta(minutes=minutes),
            **state,  # type: ignore[arg-type]
        )
    return made


async def test_recover_resends_the_failed_deliveries_of_the_range(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK)
    other = await client.create(HOOK)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    made = await _history(pool, created["id"], account.id, base)
    elsewhere = await add_delivery(
        pool, other["id"], account.id, status="failed", attempts=2, created_at=base
    )
    status, body, _ = await client.call(
        "POST",
        f"/api/v1/webhooks/{created['id']}/recover",
        # [since, until): failed_0 is in (since is inclusive), failed_30 is not (until is not).
        json={"since": "2026-11-01T00:00:00Z", "until": "2026-11-01T01:30:00+01:00"},
    )
    assert (status, body) == (202, {"recovered": 3})
    rows = {name: await _row(pool, dlv) for name, dlv in made.items()}
    for name in ("failed_0", "failed_10", "failed_20"):
        row = rows[name]
        assert (row["status"], row["retry_base"], row["claimed_by"]) == (
            "pending",
            row["attempts"],
            None,
        )
        assert row["due"], name  # the first CARGOLINT_ENDPOINT_RATE come due at once
    assert rows["failed_30"]["status"] == "failed"
    assert rows["test_failed_10"]["status"] == "failed"
    assert rows["succeeded_10"]["status"] == "succeeded"
    assert (rows["pending_10"]["status"], rows["pending_10"]["due"]) == ("pending", False)
    assert (await _row(pool, elsewhere))["status"] == "failed"

    # Until defaults to now; the three are pending now, the last failed one comes back.
    status, body, _ = await client.call(
        "POST", f"/api/v1/webhooks/{created['id']}/recover", json={"since": "2026-10-01T00:00:00Z"}
    )
    assert (status, body) == (202, {"recovered": 1})
    assert (await _row(pool, made["failed_30"]))["status"] == "pending"
    status, body, _ = await client.call(
        "POST",
        f"/api/v1/webhooks/{created['id']}/recover",
        json={"since": "2026-10-01T00:00:00Z", "until": "2026-10-01T00:00:00Z"},
    )
    assert (status, body) == (202, {"recovered": 0})


async def test_recovered_deliveries_come_due_at_the_endpoints_rate(
    http: aiohttp.ClientSession,
    api_settings: Settings,
    pool: asyncpg.Pool[Any],
    make_account: MakeAccount,
) -> None:
    runner, base_url = await start_api(with_(api_settings, endpoint_rate=2.0), pool)
    try:
        account = await make_account()
        client = Client(http, base_url, account.key)
        created = await client.create(HOOK)
        start = datetime(2026, 11, 1, tzinfo=UTC)
        ids = [
            await add_delivery(
                pool,
                created["id"],
                account.id,
                status="failed",
                attempts=1,
                created_at=start + timedelta(seconds=n),
            )
            for n in range(5)
        ]
        status, body, _ = await client.call(
            "POST",
            f"/api/v1/webhooks/{created['id']}/recover",
            json={"since": "2026-11-01T00:00:00Z"},
        )
        assert (status, body) == (202, {"recovered": 5})
        rows = [await _row(pool, dlv) for dlv in ids]
        first = rows[0]["next_attempt_at"]
        # A bucket of rate 2 and burst 2, oldest first: 2 at once, then one every half second.
        offsets = [(r["next_attempt_at"] - first).total_seconds() for r in rows]
        assert offsets == [0.0, 0.0, 0.5, 1.0, 1.5]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        ({}, "missing_field", "since"),
        ({"until": "2026-11-01T00:00:00Z"}, "missing_field", "since"),
        ({"since": None}, "invalid_type", "since"),
        ({"since": 1764547200}, "invalid_type", "since"),
        ({"since": ""}, "invalid_value", "since"),
        ({"since": "yesterday"}, "invalid_value", "since"),
        ({"since": "2026-11-01"}, "invalid_value", "since"),
        ({"since": "2026-11-01T00:00:00"}, "invalid_value", "since"),  # no offset
        ({"since": "2026-11-31T00:00:00Z"}, "invalid_value", "since"),
        ({"since": "2026-11-01T25:00:00Z"}, "invalid_value", "since"),
        ({"since": "2026-11-01 00:00:00Z"}, "invalid_value", "since"),
        ({"since": "9999-12-31T23:59:59-23:59"}, "invalid_value", "since"),
        ({"since": "2026-11-01T00:00:00Z", "until": "soon"}, "invalid_value", "until"),
        ({"since": "2026-11-01T00:00:00Z", "until": 5}, "invalid_type", "until"),
        ({"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "invalid_value",
         "since"),
        ({"since": "2999-01-01T00:00:00Z"}, "invalid_value", "since"),  # after now
        ({"since": "2026-11-01T00:00:00Z", "status": "failed"}, "unknown_field", "status"),
        ([], "invalid_body", None),
    ],
)  # fmt: skip
async def test_a_bad_recover_request_is_400_naming_the_field(
    client: Client, payload: Any, code: str, field: str | None
) -> None:
    created = await client.create(HOOK)
    status, body, _ = await client.call(
        "POST", f"/api/v1/webhooks/{created['id']}/recover", json=payload
    )
    assert status == 400, body
    assert_error(body, code, field)


async def test_recover_without_a_body_is_400_since_missing(client: Client) -> None:
    created = await client.create(HOOK)
    status, body, _ = await client.call("POST", f"/api/v1/webhooks/{created['id']}/recover")
    assert status == 400
    assert_error(body, "missing_field", "since")


async def test_recover_on_an_inactive_webhook_is_409_and_changes_nothing(
    client: Client, account: Account, pool: asyncpg.Pool[Any]
) -> None:
    created = await client.create(HOOK, active=False)
    dlv = await add_delivery(pool, created["id"], account.id, status="failed", attempts=8)
    status, body, _ = await client.call(
        "POST", f"/api/v1/webhooks/{created['id']}/recover", json={"since": "2020-01-01T00:00:00Z"}
    )
    assert status == 409
    assert_error(body, "webhook_inactive")
    assert (await _row(pool, dlv))["status"] == "failed"


async def test_recover_on_someone_elses_webhook_is_404(
    http: aiohttp.ClientSession, api: str, make_account: MakeAccount, pool: asyncpg.Pool[Any]
) -> None:
    owner = await make_account()
    created = await Client(http, api, owner.key).create(HOOK)
    dlv = await add_delivery(pool, created["id"], owner.id, status="failed", attempts=8)
    stranger = Client(http, api, (await make_account()).key)
    for webhook_id in (created["id"], "wh_000000000000", "wh_BAD"):
        status, body, _ = await stranger.call(
            "POST", f"/api/v1/webhooks/{webhook_id}/recover", json={"since": "2020-01-01T00:00:00Z"}
        )
        assert status == 404
        assert_error(body, "not_found")
    assert (await _row(pool, dlv))["status"] == "failed"


async def test_recover_reads_only_the_webhooks_failed_deliveries_of_the_range(
    pool: asyncpg.Pool[Any],
) -> None:
    # A long history, mostly succeeded: the statement must find the failed rows of the range
    # through deliveries_by_status, not read the webhook's (or the table's) whole history.
    tag = secrets.token_hex(4)
    account_id, webhook_id = f"acct_rp{tag}", f"wh_recoverplan{tag}"
    await pool.execute(
        "INSERT INTO accounts (id, name, plan) VALUES ($1, 't', 'business')", account_id
    )
    await pool.execute(
        """INSERT INTO webhooks (id, account_id, mode, url, events, secret)
           VALUES ($1, $2, 'test', 'https://example.com/hook', ARRAY['document.uploaded'],
                   'plain:whsec_test_x')""",
        webhook_id,
        account_id,
    )
    await pool.execute(
        """INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status,
                                   attempts, created_at)
           SELECT 'dlv_rp' || $2 || g, $1, 'acct_plan', 'evt_' || g, 'document.uploaded',
                  CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END, 8,
                  now() - g * interval '1 second'
           FROM generate_series(1, 30000) g""",
        webhook_id,
        tag,
    )
    await pool.execute("ANALYZE deliveries")
    queries: list[tuple[str, Any]] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda q: queries.append((q.query, q.args)))
        recovered = await resending.recover(
            conn,
            account_id=account_id,
            mode="test",
            webhook_id=webhook_id,
            since=datetime.now(UTC) - timedelta(seconds=3625),
            until=None,
            rate=100.0,
        )
        await asyncio.sleep(0)  # query loggers are called soon after, not during
        assert recovered == 72  # every 50th of the last 3,624
        (query, args) = next(q for q in queries if "UPDATE deliveries" in q[0])
        await conn.execute(
            "UPDATE deliveries SET status = 'failed' WHERE webhook_id = $1 AND status = 'pending'",
            webhook_id,
        )
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))
    assert "deliveries_by_status" in plan, plan
    assert "Seq Scan on deliveries" not in plan, plan

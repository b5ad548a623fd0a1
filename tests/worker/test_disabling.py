"""Webhooks the engine disables (docs/contract.md §6), end to end with real HTTPS receivers:
410 Gone at once, every attempt failing for CARGOLINT_DISABLE_AFTER, and never by a test
delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from engine.settings import Settings
from engine.store.accounts import create_account
from engine.store.disabling import DISABLED
from engine.worker.main import Worker
from tests.api.conftest import start_api
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    eventually,
    insert_pending,
    make_event,
    make_webhook,
    publish_one,
    subscribed,
    wait_final,
)

Answer = Callable[[web.Request, bytes], Any]


def answering(status: int) -> Answer:
    async def answer(_: web.Request, __: bytes) -> web.Response:
        return web.Response(status=status)

    return answer


async def _webhook(pool: asyncpg.Pool[Any], webhook_id: str) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT * FROM webhooks WHERE id = $1", webhook_id
    )
    assert row is not None
    return row


async def _disabled(pool: asyncpg.Pool[Any], webhook_id: str, timeout: float = 15.0) -> None:
    async def inactive() -> bool:
        return not (await _webhook(pool, webhook_id))["active"]

    await eventually(inactive, timeout=timeout)


def _counted(worker: Worker, reason: str) -> float | None:
    return worker.metrics.registry.get_sample_value(
        "cargolint_webhooks_webhooks_disabled_total", {"reason": reason}
    )


def _logged(caplog: pytest.LogCaptureFixture, webhook_id: str) -> list[str]:
    return [
        r.reason  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "webhook disabled" and getattr(r, "webhook_id", None) == webhook_id
    ]


async def _attempt_times(pool: asyncpg.Pool[Any], delivery_id: str) -> list[Any]:
    rows = await pool.fetch(
        "SELECT attempted_at FROM delivery_attempts WHERE delivery_id = $1 ORDER BY number",
        delivery_id,
    )
    return [r["attempted_at"] for r in rows]


async def test_410_gone_ends_the_delivery_at_once_and_disables_the_webhook(
    *,
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    make_receiver: Callable[..., Any],
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    receiver.handler = answering(410)
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    other = await make_receiver()
    other_id, _ = await make_webhook(pool, wsettings, account, other.url)
    # Retries of earlier events, waiting for later: they end with the webhook.
    await insert_pending(
        pool, "dlv_later_", 2, webhook_id=webhook_id, account_id=account, due_in=timedelta(hours=1)
    )
    event = make_event(account)
    await publisher.publish(event)
    delivery_id = dlv(webhook_id, account, event)

    row = (await wait_final(pool, [delivery_id]))[delivery_id]
    assert (row["status"], row["attempts"], row["response_status"]) == ("failed", 1, 410)
    assert row["next_attempt_at"] is None
    await _disabled(pool, webhook_id)
    webhook = await _webhook(pool, webhook_id)
    assert webhook["disabled_reason"] == "gone"
    assert webhook["disabled_at"] is not None
    later = await pool.fetch(
        "SELECT status, error FROM deliveries WHERE id LIKE 'dlv_later_%' AND webhook_id = $1",
        webhook_id,
    )
    assert [(r["status"], r["error"]) for r in later] == [("failed", DISABLED)] * 2
    await eventually(lambda: worker.cache.get(webhook_id) is None)
    assert _counted(worker, "gone") == 1
    assert _counted(worker, "failing") == 0
    assert _logged(caplog, webhook_id) == ["gone"]

    # No retry of the 410, and a new event goes to the other webhook only.
    await other.wait_for(1)
    second = make_event(account)
    await publisher.publish(second)
    await other.wait_for(2)
    await wait_final(pool, [dlv(other_id, account, second)])
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE webhook_id = $1 AND event_id = $2",
            webhook_id,
            second["id"],
        )
        == 0
    )
    assert len(receiver.requests) == 1


@pytest.mark.slow
async def test_a_webhook_failing_for_disable_after_is_disabled_at_its_next_failure(
    *,
    start_worker: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    worker = await start_worker(disable_after=2.0, retry_schedule=(0.5,) * 12)
    failing = True
    streak_restarted = asyncio.Event()

    async def flaky(_: web.Request, __: bytes) -> web.Response:
        # Fails, succeeds once after the first event's third attempt, then fails for good.
        nonlocal failing
        if len(receiver.requests) == 4:
            failing = False
        elif not failing:
            failing = True
            streak_restarted.set()
        return web.Response(status=500 if failing else 200)

    receiver.handler = flaky
    one = await publish_one(worker, pool, worker.settings, publisher, receiver.url)
    account, webhook_id, first_id = one.account, one.webhook_id, one.id
    row = (await wait_final(pool, [first_id]))[first_id]
    assert (row["status"], row["attempts"]) == ("succeeded", 4)
    await eventually(
        lambda: _failing_since_is(pool, webhook_id, None), timeout=5.0
    )  # the success ended the streak

    second = make_event(account)
    await publisher.publish(second)
    second_id = dlv(webhook_id, account, second)
    await _disabled(pool, webhook_id)

    times = await _attempt_times(pool, second_id)
    webhook = await _webhook(pool, webhook_id)
    assert webhook["disabled_reason"] == "failing"
    # Counted from the first failure after the success, not from the first failure of all.
    assert webhook["failing_since"] == times[0]
    period = timedelta(seconds=worker.settings.disable_after)
    past = [i for i, t in enumerate(times) if t - times[0] >= period]
    # Disabled at the first failed attempt after the period: none was made after it.
    assert past == [len(times) - 1]
    row = (await wait_final(pool, [second_id]))[second_id]
    assert (row["status"], row["error"]) == ("failed", DISABLED)
    assert _counted(worker, "failing") == 1
    assert _logged(caplog, webhook_id) == ["failing"]
    assert streak_restarted.is_set()


async def _failing_since_is(pool: asyncpg.Pool[Any], webhook_id: str, value: Any) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT failing_since IS NOT DISTINCT FROM $2 FROM webhooks WHERE id = $1",
            webhook_id,
            value,
        )
    )


async def test_test_deliveries_never_change_a_webhook(
    receiver: Receiver, pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    async with pool.acquire() as conn:
        account_id, key = await create_account(conn, name="Acme", plan="business", mode="live")
    webhook_id, _ = await make_webhook(pool, wsettings, account_id, receiver.url)
    runner, base = await start_api(wsettings, pool)
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": key}) as http:

            async def test_delivery() -> dict[str, Any]:
                url = f"{base}/api/v1/webhooks/{webhook_id}/test"
                async with http.post(url) as response:
                    assert response.status == 200
                    record: dict[str, Any] = await response.json()
                    return record

            receiver.handler = answering(410)
            record = await test_delivery()
            assert (record["status"], record["responseStatus"]) == ("failed", 410)
            webhook = await _webhook(pool, webhook_id)
            assert webhook["active"] is True
            assert webhook["disabled_reason"] is None
            assert webhook["failing_since"] is None

            # Nor does a successful one end a failing streak.
            since = await pool.fetchval(
                "UPDATE webhooks SET failing_since = now() - interval '1 hour' WHERE id = $1"
                " RETURNING failing_since",
                webhook_id,
            )
            receiver.handler = None
            record = await test_delivery()
            assert record["status"] == "succeeded"
            assert (await _webhook(pool, webhook_id))["failing_since"] == since
    finally:
        await runner.cleanup()


async def test_a_disabled_webhook_re_enabled_through_the_api_recovers_what_failed(
    *,
    start_worker: Callable[..., Any],
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    worker = await start_worker(disable_after=1.0, retry_schedule=(0.3,) * 10)
    async with pool.acquire() as conn:
        account, key = await create_account(conn, name="Acme", plan="business", mode="live")
    receiver.handler = answering(500)
    runner, base = await start_api(wsettings, pool)
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": key}) as http:

            async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                async with http.request(method, f"{base}/api/v1{path}", json=body) as response:
                    return response.status, await response.json()

            status, created = await call(
                "POST",
                "/webhooks",
                {"url": receiver.url + "/hook", "events": ["document.uploaded"]},
            )
            assert status == 201, created
            webhook_id = created["id"]
            await eventually(lambda: worker.cache.get(webhook_id) is not None)
            events = [make_event(account) for _ in range(3)]
            await publisher.publish_many(events)
            ids = [dlv(webhook_id, account, e) for e in events]
            await _disabled(pool, webhook_id)

            status, shown = await call("GET", f"/webhooks/{webhook_id}")
            assert status == 200
            assert (shown["active"], shown["disabledReason"]) == (False, "failing")
            assert shown["disabledAt"] is not None
            rows = await wait_final(pool, ids)
            assert {r["status"] for r in rows.values()} == {"failed"}
            attempts_before = {i: r["attempts"] for i, r in rows.items()}

            receiver.handler = None  # the receiver is fixed
            status, shown = await call("PUT", f"/webhooks/{webhook_id}", {"active": True})
            assert status == 200
            assert (shown["active"], shown["disabledReason"], shown["disabledAt"]) == (
                True,
                None,
                None,
            )
            assert (await _webhook(pool, webhook_id))["failing_since"] is None
            await eventually(lambda: worker.cache.get(webhook_id) is not None)
            status, body = await call(
                "POST", f"/webhooks/{webhook_id}/recover", {"since": "2026-01-01T00:00:00Z"}
            )
            assert (status, body) == (202, {"recovered": len(ids)})
            rows = await wait_final(pool, ids)
            assert {r["status"] for r in rows.values()} == {"succeeded"}
            for delivery_id, row in rows.items():
                assert row["attempts"] == attempts_before[delivery_id] + 1
            delivered = {r.headers["X-CargoLint-Delivery"] for r in receiver.requests[-len(ids) :]}
            assert delivered == set(ids)
            assert (await _webhook(pool, webhook_id))["active"] is True
    finally:
        await runner.cleanup()

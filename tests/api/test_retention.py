"""Deliveries past the retention vanish from the API: absent from lists, 404 on detail.

The purge is the worker's (engine.worker.retention), run here once against the API's database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from engine.settings import Settings
from engine.worker.metrics import Metrics
from engine.worker.retention import Purger
from tests.api.conftest import Account, Client
from tests.api.deliveries import add_delivery
from tests.conftest import with_


def _ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


async def _purge(settings: Settings) -> None:
    purger = Purger(with_(settings, retention=3600.0), metrics=Metrics())
    while (await purger.run_once()).more:
        pass


async def _listed(client: Client, hook: str, **params: str) -> tuple[list[str], int]:
    status, body, _ = await client.call(
        "GET", f"/api/v1/webhooks/{hook}/deliveries", params={"limit": "100", **params}
    )
    assert status == 200, body
    return [d["id"] for d in body["data"]], body["total"]


@pytest.mark.slow
async def test_purged_deliveries_leave_the_list_and_the_rest_stays(
    client: Client, account: Account, pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    hook = (await client.create("https://example.com/hook"))["id"]

    async def add(status: str, hours: float) -> str:
        return await add_delivery(
            pool, hook, account.id, status=status, attempts=1, created_at=_ago(hours)
        )

    gone = [await add("succeeded", 3), await add("failed", 2)]
    pending = await add("pending", 24 * 400)
    young = [await add("succeeded", 0.5), await add("failed", 0.1)]
    before, total_before = await _listed(client, hook)
    assert set(before) == {*gone, pending, *young}
    assert total_before == 5

    await _purge(settings)

    after, total_after = await _listed(client, hook)
    assert after == [young[1], young[0], pending]  # newest first, the purged ones gone
    assert total_after == 3
    failed, failed_total = await _listed(client, hook, status="failed")
    assert (failed, failed_total) == ([young[1]], 1)


async def test_a_purged_delivery_is_404_on_detail(
    client: Client, account: Account, pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    hook = (await client.create("https://example.com/hook"))["id"]
    gone = await add_delivery(
        pool, hook, account.id, status="failed", attempts=1, created_at=_ago(2)
    )
    pending = await add_delivery(pool, hook, account.id, status="pending", created_at=_ago(48))
    path = f"/api/v1/webhooks/{hook}/deliveries/"
    assert (await client.call("GET", path + gone))[0] == 200

    await _purge(settings)

    status, body, _ = await client.call("GET", path + gone)
    assert status == 404, body
    assert body["error"]["code"] == "not_found"
    assert (await client.call("GET", path + pending))[0] == 200

"""Endpoint leases and per-endpoint claims, statement by statement, on the real database."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from engine.settings import Settings
from engine.store.endpoints import (
    acquire_leases,
    fill_endpoints,
    leases_held,
    release_leases,
    unowned_with_due_work,
)
from engine.store.queue import heartbeat, release_worker
from engine.worker.admission import endpoint_key
from engine.worker.leases import Leases
from tests.worker.helpers import insert_pending

LEASE = 15.0


def _tag() -> str:
    return secrets.token_hex(4)


@pytest.mark.parametrize(
    "url",
    [
        "https://Example.COM/hooks",
        "HTTPS://hooks.example.com:8443/a?b=c",
        "https://hooks.example.com:443",
        "https://hooks.example.com:/x",
        "http://127.0.0.1:9000/",
        "https://[2001:db8::1]/x",
        "https://[::1]:8443/x#frag",
        "https://user:pw@Example.com:0443/",
        "https://example.com?x=1",
    ],
)
async def test_postgres_names_an_endpoint_as_the_worker_does(
    pool: asyncpg.Pool[Any], url: str
) -> None:
    assert await pool.fetchval("SELECT cargolint_endpoint($1)", url) == endpoint_key(url)


async def _worker(pool: asyncpg.Pool[Any], *, silent_for: float = 0.0) -> str:
    worker_id = f"wrk_test_{_tag()}"
    await heartbeat(pool, worker_id, "test")
    if silent_for:
        await pool.execute(
            "UPDATE workers SET heartbeat_at = now() - make_interval(secs => $2) WHERE id = $1",
            worker_id,
            silent_for,
        )
    return worker_id


async def test_one_live_worker_holds_an_endpoint_and_a_silent_ones_is_taken_over(
    pool: asyncpg.Pool[Any],
) -> None:
    endpoint = f"https://{_tag()}.example:443"
    first, second = await _worker(pool), await _worker(pool)

    # Never leased: quiet, so its first holder may start with a full bucket.
    assert await acquire_leases(pool, first, [endpoint], lease=LEASE) == {endpoint: True}
    assert await acquire_leases(pool, second, [endpoint], lease=LEASE) == {}
    assert await acquire_leases(pool, first, [endpoint], lease=LEASE) == {endpoint: False}
    assert endpoint in await leases_held(pool, first)

    # Its holder goes silent for a lease: the next taker starts with an empty bucket.
    await pool.execute(
        "UPDATE workers SET heartbeat_at = now() - interval '20 seconds' WHERE id = $1", first
    )
    assert await acquire_leases(pool, second, [endpoint], lease=LEASE) == {endpoint: False}
    assert endpoint not in await leases_held(pool, first)
    assert endpoint in await leases_held(pool, second)


async def test_a_released_endpoint_is_quiet_only_a_bucket_refill_later(
    pool: asyncpg.Pool[Any],
) -> None:
    endpoint = f"https://{_tag()}.example:443"
    first, second = await _worker(pool), await _worker(pool)
    await acquire_leases(pool, first, [endpoint], lease=LEASE)
    await release_leases(pool, first, [endpoint])
    assert await leases_held(pool, first) == set()
    # Just released: its holder may have sent a bucket's worth a moment ago.
    assert await acquire_leases(pool, second, [endpoint], lease=LEASE) == {endpoint: False}
    await release_leases(pool, second, None)
    await asyncio.sleep(1.1)
    assert await acquire_leases(pool, first, [endpoint], lease=LEASE) == {endpoint: True}


async def test_two_workers_asking_at_once_get_an_endpoint_once(pool: asyncpg.Pool[Any]) -> None:
    endpoints = [f"https://{_tag()}.example:443" for _ in range(50)]
    workers = [await _worker(pool) for _ in range(4)]
    results = await asyncio.gather(
        *(acquire_leases(pool, w, endpoints, lease=LEASE) for w in workers)
    )
    taken = [e for result in results for e in result]
    assert sorted(taken) == sorted(endpoints)


async def test_stopping_releases_a_workers_leases(pool: asyncpg.Pool[Any]) -> None:
    endpoint = f"https://{_tag()}.example:443"
    worker, other = await _worker(pool), await _worker(pool)
    await acquire_leases(pool, worker, [endpoint], lease=LEASE)
    await release_worker(pool, worker)
    assert await acquire_leases(pool, other, [endpoint], lease=LEASE) == {endpoint: False}


async def test_endpoints_with_due_work_and_no_live_holder_are_found_past_any_backlog(
    pool: asyncpg.Pool[Any],
) -> None:
    tag = _tag()
    deep, light, later, held = (f"https://{tag}-{n}.example:443" for n in range(4))
    # A deep backlog first in the index order; then an endpoint with one due delivery; one with
    # work only later; one with due work whose lease a live worker holds.
    for prefix, endpoint, count, due_in in (
        ("deep", deep, 3000, timedelta(0)),
        ("light", light, 1, timedelta(0)),
        ("later", later, 5, timedelta(hours=1)),
        ("held", held, 5, timedelta(0)),
    ):
        await insert_pending(
            pool,
            f"dlv_{prefix}_{tag}_",
            count,
            webhook_id="wh_leases",
            account_id="acct_leases",
            due_in=due_in,
        )
        await pool.execute(
            "UPDATE deliveries SET endpoint = $2 WHERE id LIKE $1 || '%'",
            f"dlv_{prefix}_{tag}_",
            endpoint,
        )
    await acquire_leases(pool, await _worker(pool), [held], lease=LEASE)
    # A silent worker's lease does not count.
    await acquire_leases(pool, await _worker(pool, silent_for=60), [light], lease=LEASE)
    await pool.execute("ANALYZE deliveries")

    found = await unowned_with_due_work(pool, lease=LEASE, limit=10_000)
    assert deep in found
    assert light in found
    assert later not in found
    assert held not in found


async def test_pending_deliveries_written_without_an_endpoint_get_one(
    pool: asyncpg.Pool[Any],
) -> None:
    url = f"https://{_tag()}.example/hook"
    account = f"acct_{_tag()}"
    await pool.execute(
        "INSERT INTO accounts (id, name, plan) VALUES ($1, 't', 'business')", account
    )
    webhook_id = f"wh_{_tag()}"
    await pool.execute(
        """INSERT INTO webhooks (id, account_id, mode, url, events, secret, active)
           VALUES ($1, $2, 'live', $3, '{document.uploaded}', 'plain:x', true)""",
        webhook_id,
        account,
        url,
    )
    await insert_pending(
        pool, f"dlv_fill_{webhook_id}_", 3, webhook_id=webhook_id, account_id=account
    )
    assert await fill_endpoints(pool) >= 3
    endpoints = await pool.fetch(
        "SELECT DISTINCT endpoint FROM deliveries WHERE webhook_id = $1", webhook_id
    )
    assert [r["endpoint"] for r in endpoints] == [endpoint_key(url)]


async def test_a_lease_the_worker_forgot_is_given_up_at_the_next_check(
    pool: asyncpg.Pool[Any], wsettings: Settings
) -> None:
    worker_id = await _worker(pool)
    leases = Leases(wsettings, pool, worker_id)
    leases.renewed(time.monotonic())
    kept, forgotten = (f"https://{_tag()}.example:443" for _ in range(2))
    assert set(await leases.acquire([kept, forgotten])) == {kept, forgotten}
    leases.forget([forgotten])  # as if giving it up in Postgres had failed

    assert await leases.verify() == set()
    assert await leases_held(pool, worker_id) == {kept}
    assert leases.owns(kept)
    assert not leases.owns(forgotten)

"""Two scenarios about long histories, run only when named (`--only retention history`).

`retention`: the throughput scenario run twice in one worker each, without and then with a purge
under way (`CARGOLINT_RETENTION` [3650d] against the default 30d) over millions of old rows
written beforehand with `INSERT … SELECT generate_series`; then the purge is let finish. Figures:
the ratio of the two runs' rates and p99s, rows removed, the tables' size before and after.

`history`: one webhook with ten million deliveries over 29 days; the p99 of the delivery list's
first page and of a page at offset 5,000,000, each with and without a status filter, read with
the store's own list function on the benchmark's pool (the API adds its constant overhead).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench.data import Webhook, checkpoint, insert_webhooks, settle, webhook_id
from bench.scenarios import FAST_LIMITS, FULL, Bench, _drain, _paced
from engine.store.db import connect
from engine.store.deliveries import DeliveryFilter, list_deliveries
from engine.store.delivery_counts import count_hours

__all__ = ["history", "retention"]

TABLES = ("deliveries", "delivery_attempts", "events")
# Written without the triggers (history written before the counts exist, as after migrating):
# session_replication_role = replica skips ordinary triggers on this connection.
_QUIET = "SET session_replication_role = replica"


_REMOVED = 'cargolint_webhooks_retention_removed_total{table="deliveries"}'


def _full(b: Bench) -> bool:
    return b.sizes.throughput_events >= FULL.throughput_events


async def _sizes(pool: asyncpg.Pool[Any]) -> dict[str, int]:
    """Bytes on disk of each table with its indexes and TOAST (pg_total_relation_size)."""
    rows = await pool.fetch(
        "SELECT t, pg_total_relation_size(t::regclass) AS size FROM unnest($1::text[]) t",
        list(TABLES),
    )
    return {r["t"]: int(r["size"]) for r in rows}


async def _generate(b: Bench, sql: str, *args: Any) -> float:
    """Run a generating statement (or VACUUM) on a connection of its own, without the pool's
    statement timeout; return the seconds it took."""
    conn = await asyncpg.connect(b.database_url)
    try:
        await conn.execute(_QUIET)
        started = time.perf_counter()
        await conn.execute(sql, *args)
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _between(b: Bench) -> None:
    """`Bench.after_worker` with a VACUUM that may take longer than the pool's timeout."""
    await b.publisher.purge()
    await settle(b.pool)
    await _generate(b, "VACUUM (ANALYZE) deliveries, delivery_attempts, events")
    await checkpoint(b.pool)


# Old rows as the worker leaves them: an event, its one delivery ended succeeded, one attempt.
_OLD_EVENTS = """
    INSERT INTO events (account_id, id, mode, type, "timestamp", data, received_at)
    SELECT 'acct_old', 'evt_old_' || g, 'live', 'document.uploaded', '2026-03-02T11:45:00Z',
           convert_to('{"document":{"id":"doc_' || g || '","fileName":"' || repeat('x', 900)
                      || '.pdf","documentType":"invoice","status":"processing"}}', 'UTF8'),
           now() - interval '40 days' + g * interval '5 milliseconds'
    FROM generate_series(1, $1) g"""
_OLD_DELIVERIES = """
    INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status, attempts,
                            response_status, response_time_ms, created_at, last_attempt_at)
    SELECT 'dlv_old' || lpad(g::text, 17, '0'), $2, 'acct_old', 'evt_old_' || g,
           'document.uploaded', 'succeeded', 1, 200, 12,
           now() - interval '40 days' + g * interval '5 milliseconds',
           now() - interval '40 days' + g * interval '5 milliseconds'
    FROM generate_series(1, $1) g"""
_OLD_ATTEMPTS = """
    INSERT INTO delivery_attempts (delivery_id, number, attempted_at, response_status,
                                   response_time_ms, response_body)
    SELECT 'dlv_old' || lpad(g::text, 17, '0'), 1,
           now() - interval '40 days' + g * interval '5 milliseconds', 200, 12, '{"ok":true}'
    FROM generate_series(1, $1) g"""


async def _throughput_run(b: Bench, name: str, retention: str) -> tuple[float | None, float]:
    """Prefilled deliveries drained by a fresh worker, then a paced phase in it; return
    (deliveries/s, paced p99 ms). Waits for the first purge batch when one is expected."""
    n = b.sizes.throughput_events
    account = f"acct_{name}"
    hooks = [Webhook(webhook_id(name, 0), account, b.receiver.url("ok", 0))]
    await insert_webhooks(b.pool, hooks)
    await b.receiver.reset()
    await b.publisher.prefill([(f"evt_{name}_{i}", account) for i in range(n)])
    async with b.worker(name, **FAST_LIMITS, CARGOLINT_RETENTION=retention) as worker:
        meter = b.cpu_meter(worker)
        drained = await _drain(b, name, hooks, n, worker)
        b.record_cpu(name, meter, n)
        if b.rate is None and drained:  # both paced phases at half of the first drain's rate
            b.rate = drained[0] / drained[1] / 2
        stats = await _paced(b, worker, f"{name}_paced", [account], {account})
        metrics = await worker.metrics()
    b.results.extra[f"{name}_purged_during"] = int(metrics.get(_REMOVED, 0.0))
    rps = drained[0] / drained[1] if drained else None
    p99 = stats["latency"]["p99"]
    return rps, (p99 * 1000 if p99 is not None else float("nan"))


async def retention(b: Bench) -> None:
    """Throughput and p99 without and with a purge of millions of old rows under way."""
    rows = 5_000_000 if _full(b) else 200_000
    old_hook = Webhook(webhook_id("old", 0), "acct_old", b.receiver.url("ok", 0))
    await insert_webhooks(b.pool, [old_hook])
    seconds = 0.0
    for sql in (_OLD_EVENTS, _OLD_DELIVERIES, _OLD_ATTEMPTS):
        seconds += await _generate(b, sql, rows, *([old_hook.id] if sql is _OLD_DELIVERIES else []))
    await _generate(b, "VACUUM (ANALYZE) deliveries, delivery_attempts, events")
    b.results.extra["retention_generate_s"] = round(seconds, 1)
    # Their hours counted, as a running system's would be (the worker counts each hour once).
    conn = await connect(b.database_url)
    try:
        await count_hours(conn, datetime.now(UTC))
    finally:
        await conn.close()
    before = await _sizes(b.pool)
    b.results.extra["retention_bytes_before"] = before
    b.results.extra["retention_bytes_per_delivery"] = round(sum(before.values()) / rows)
    await _between(b)

    base_rps, base_p99 = await _throughput_run(b, "rtbase", "3650d")
    await _between(b)
    started = time.perf_counter()
    purge_rps, purge_p99 = await _throughput_run(b, "rtpurge", "30d")
    # Let the purge finish in a worker with nothing else to do, at a whole backend's pace (what
    # an operator may allow at a quiet hour): the measured run above kept the default share.
    during = b.results.extra.get("rtpurge_purged_during", 0)
    removed = during
    async with b.worker("rtfinish", **FAST_LIMITS, CARGOLINT_PURGE_SHARE="1") as worker:
        deadline = time.monotonic() + (3600 if _full(b) else 300)
        while removed < rows and time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            metrics = await worker.metrics()
            removed = during + int(metrics.get(_REMOVED, 0.0))
    b.results.extra["retention_purge_s"] = round(time.perf_counter() - started, 1)
    b.figures["retention_rows_removed"] = removed
    b.results.extra["retention_bytes_after_purge"] = await _sizes(b.pool)
    await _between(b)  # VACUUM: the space of removed rows is free for new ones
    b.results.extra["retention_bytes_after_vacuum"] = await _sizes(b.pool)
    b.results.extra["retention_rps"] = {"without": base_rps, "with": purge_rps}
    b.results.extra["retention_p99_ms"] = {"without": base_p99, "with": purge_p99}
    ratio = purge_rps / base_rps if purge_rps and base_rps else None
    b.figures["retention_throughput_ratio"] = ratio
    b.figures["retention_p99_ratio"] = purge_p99 / base_p99 if base_p99 else None
    b.results.check("retention: the purge removed every old row", removed >= rows, f"{removed}")
    # Targets of the opt-in scenarios, judged here (the table's targets are every run's).
    b.results.extra["retention_targets_met"] = {
        "throughput within 10 %": ratio is not None and ratio >= 0.9,
        "p99 within 10 %": bool(base_p99) and purge_p99 <= 1.1 * base_p99,
    }


_HISTORY = """
    INSERT INTO deliveries (id, webhook_id, account_id, event_id, event_type, status, attempts,
                            response_status, response_time_ms, created_at, last_attempt_at)
    SELECT 'dlv_hist' || lpad(g::text, 16, '0'), $2, 'acct_hist', 'evt_hist_' || g,
           (ARRAY['document.uploaded', 'compliance.warning',
                  'document.batch_downloaded'])[1 + g % 3],
           CASE WHEN g % 40 = 0 THEN 'failed' WHEN g % 997 = 0 THEN 'pending'
                ELSE 'succeeded' END,
           1, 200, 12, t, t
    FROM generate_series(1, $1) g,
         LATERAL (SELECT now() - interval '29 days' + g * ($3 * interval '1 second')) AS at(t)"""


async def _latency(
    pool: asyncpg.Pool[Any], hook: str, filters: DeliveryFilter, offset: int
) -> tuple[float, float]:
    """(p50, p99) in ms of 200 list requests (20 per page) after 20 to warm up."""
    times: list[float] = []
    for i in range(220):
        async with pool.acquire() as conn:
            started = time.perf_counter()
            await list_deliveries(conn, hook, filters, offset=offset, limit=20)
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(times, n=100)
    return round(cuts[49], 2), round(cuts[98], 2)


async def history(b: Bench) -> None:
    """The delivery list of one webhook with ten million deliveries."""
    rows = 10_000_000 if _full(b) else 200_000
    hook = Webhook(webhook_id("hist", 0), "acct_hist", b.receiver.url("ok", 0))
    await insert_webhooks(b.pool, [hook])
    spacing = 29 * 86400 / rows
    generated = await _generate(b, _HISTORY, rows, hook.id, spacing)
    b.results.extra["history_generate_s"] = round(generated, 1)
    vacuumed = await _generate(b, "VACUUM (ANALYZE) deliveries")
    b.results.extra["history_vacuum_s"] = round(vacuumed, 1)
    conn = await connect(b.database_url)
    try:
        started = time.perf_counter()
        await count_hours(conn, datetime.now(UTC))
        b.results.extra["history_count_hours_s"] = round(time.perf_counter() - started, 1)
    finally:
        await conn.close()
    deep = rows // 2
    pages, medians = {}, {}
    for label, filters in (("all", DeliveryFilter()), ("succeeded", DeliveryFilter("succeeded"))):
        for where, offset in (("first", 0), ("deep", deep)):
            key = f"{where}_{label}"
            medians[key], pages[key] = await _latency(b.pool, hook.id, filters, offset)
    b.results.extra["history_p99_ms"] = pages
    b.results.extra["history_p50_ms"] = medians
    first = max(pages["first_all"], pages["first_succeeded"])
    deepest = max(pages["deep_all"], pages["deep_succeeded"])
    b.figures["list_first_page_ms"] = first
    b.figures["list_deep_page_ms"] = deepest
    b.results.extra["history_bytes"] = await _sizes(b.pool)
    b.results.extra["history_targets_met"] = {
        "first page < 10 ms": first < 10,
        "page at offset 5,000,000 < 50 ms": deepest < 50,
    }
    b.results.check("history: pages read", all(v > 0 for v in pages.values()))

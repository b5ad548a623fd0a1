"""One chaos run: a migrated throwaway database, an account and webhooks, real worker
subprocesses, a publisher that rides out broker restarts, and the report of what arrived."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from engine.core.crypto import SecretBox
from engine.store.accounts import create_account
from engine.store.migrate import migrate
from engine.store.webhooks import create_webhook
from tests.chaos.harness import Proc, engine_env, free_port, make_event
from tests.chaos.receivers import CountingReceiver
from tests.chaos.services import ThrowawayPostgres

__all__ = ["REPORTS", "ChaosRun", "Report", "StreamPublisher", "scale"]

REPORTS: list[Report] = []


def scale(default: int) -> int:
    """The event count for a scenario: `default`, or CARGOLINT_CHAOS_EVENTS if set (for CI)."""
    raw = os.environ.get("CARGOLINT_CHAOS_EVENTS", "").strip()
    return min(default, int(raw)) if raw else default


@dataclass
class Report:
    """What one scenario came to. `lost` must be 0."""

    scenario: str
    events_sent: int
    deliveries_expected: int
    delivered: int
    duplicates: int
    lost: int
    recovery_s: float | None
    wall_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def one_per_event(
        cls,
        scenario: str,
        total: int,
        *,
        receiver: CountingReceiver,
        run: ChaosRun,
        recovery_s: float | None,
        notes: dict[str, Any],
    ) -> Report:
        """The report of a run where each of `total` events makes one delivery."""
        return cls(
            scenario=scenario,
            events_sent=total,
            deliveries_expected=total,
            delivered=receiver.delivered,
            duplicates=receiver.duplicates,
            lost=total - receiver.delivered,
            recovery_s=recovery_s,
            wall_s=run.wall(),
            notes=notes,
        )

    def line(self) -> str:
        recovery = "n/a" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        notes = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"{self.scenario}: events sent={self.events_sent} "
            f"deliveries expected={self.deliveries_expected} delivered={self.delivered} "
            f"duplicates={self.duplicates} lost={self.lost} recovery={recovery} "
            f"wall={self.wall_s:.1f}s {notes}"
        ).rstrip()

    def publish(self) -> None:
        REPORTS.append(self)
        print(self.line())
        if path := os.environ.get("CARGOLINT_CHAOS_REPORT"):
            with Path(path).open("a") as f:
                f.write(orjson.dumps(asdict(self)).decode() + "\n")


# Fast but realistic settings for the worker subprocesses.
WORKER_ENV = {
    "endpoint_rate": "5000",
    "endpoint_concurrency": "32",
    "retry_schedule": "1s,2s,4s,8s",
    "delivery_timeout": "5",
    "poll_interval": "0.2",
    "worker_lease": "3",
    "shutdown_grace": "5",
    "log_level": "INFO",
}


class ChaosRun:
    """The database side of a run, and worker processes pointed at given ports."""

    def __init__(
        self,
        pg: ThrowawayPostgres,
        amqp_url: str,
        ca_file: Path,
        logdir: Path,
        *,
        worker_db_port: int | None = None,
        **env: str,
    ) -> None:
        self.pg = pg
        self.amqp_url = amqp_url
        self.database_url = pg.url("cargolint")
        # Workers may reach Postgres through a proxy; our own checks never do.
        worker_db = pg.url("cargolint", port=worker_db_port)
        self.env = engine_env(
            database_url=worker_db,
            amqp_url=amqp_url,
            ca_file=ca_file,
            **{**WORKER_ENV, **env},
        )
        self.logdir = logdir
        self.account_id = ""
        self.run_id = ""
        self.webhooks: list[str] = []
        self.workers: list[Proc] = []
        self.started = time.monotonic()

    async def setup(
        self, urls: list[str], events: tuple[str, ...] = ("document.uploaded",)
    ) -> None:
        await migrate(self.database_url)
        conn = await asyncpg.connect(self.database_url)
        try:
            self.account_id, _ = await create_account(
                conn, name="Chaos", plan="business", mode="test"
            )
            for url in urls:
                row, _ = await create_webhook(
                    conn,
                    account_id=self.account_id,
                    mode="test",
                    url=url,
                    events=list(events),
                    active=True,
                    description=None,
                    box=SecretBox(()),
                    limit=100,
                )
                self.webhooks.append(row["id"])
        finally:
            await conn.close()
        self.run_id = self.account_id[-8:]

    def events(self, count: int) -> list[dict[str, Any]]:
        return [make_event(i, self.account_id, run=self.run_id) for i in range(count)]

    async def start_worker(self, name: str = "worker", **env: str) -> Proc:
        worker_env = dict(self.env)
        worker_env.update({f"CARGOLINT_{k.upper()}": v for k, v in env.items()})
        if self.workers:  # each worker its own metrics port
            worker_env["CARGOLINT_METRICS_PORT"] = str(free_port())
        proc = Proc(name, ["worker"], worker_env, self.logdir).start()
        self.workers.append(proc)
        await proc.ready(timeout=60)
        return proc

    async def stop_workers(self) -> list[int]:
        return [await w.terminate() for w in self.workers]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def statuses(self) -> dict[str, int]:
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT status, count(*) AS n FROM deliveries WHERE NOT is_test GROUP BY status"
            )
        finally:
            await conn.close()
        return {r["status"]: r["n"] for r in rows}

    async def all_succeeded(self, total: int) -> bool:
        """True once at least `total` deliveries are recorded `succeeded`."""
        return (await self.statuses()).get("succeeded", 0) >= total

    async def events_recorded(self) -> int:
        try:
            return int(await self.fetchval("SELECT count(*) FROM events"))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return -1

    async def inconsistencies(self) -> list[str]:
        """Records that disagree with each other: the 'nothing half-written' check."""
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            problems = []
            bad_counts = await conn.fetchval(
                """SELECT count(*) FROM deliveries d
                   WHERE d.attempts <> (SELECT count(*) FROM delivery_attempts a
                                        WHERE a.delivery_id = d.id)"""
            )
            if bad_counts:
                problems.append(
                    f"{bad_counts} deliveries whose attempts disagree with attempt rows"
                )
                # The same attempt written twice (a retried write whose first commit did land)
                # or a second request sent under the same attempt number?
                twice = await conn.fetchval(
                    """SELECT count(*) FROM (
                           SELECT delivery_id, number, attempted_at FROM delivery_attempts
                           GROUP BY 1, 2, 3 HAVING count(*) > 1) t"""
                )
                resent = await conn.fetchval(
                    """SELECT count(*) FROM (
                           SELECT delivery_id, number FROM delivery_attempts
                           GROUP BY 1, 2 HAVING count(DISTINCT attempted_at) > 1) t"""
                )
                problems.append(f"{twice} attempts recorded twice, {resent} numbers sent twice")
            bad_success = await conn.fetchval(
                """SELECT count(*) FROM deliveries d WHERE d.status = 'succeeded' AND NOT EXISTS (
                       SELECT 1 FROM delivery_attempts a WHERE a.delivery_id = d.id
                       AND a.response_status BETWEEN 200 AND 299)"""
            )
            if bad_success:
                problems.append(f"{bad_success} succeeded deliveries without a 2xx attempt")
            orphans = await conn.fetchval(
                """SELECT count(*) FROM events e WHERE NOT EXISTS (
                       SELECT 1 FROM deliveries d
                       WHERE d.account_id = e.account_id AND d.event_id = e.id)"""
            )
            if orphans:
                problems.append(f"{orphans} events without deliveries")
            return problems
        finally:
            await conn.close()

    def wall(self) -> float:
        return time.monotonic() - self.started

    def output(self) -> str:
        return "\n".join(w.output() for w in self.workers)


async def queue_depths(amqp_url: str) -> tuple[int, int]:
    """Messages ready in the events queue and in the dead-letter queue."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        events = await channel.declare_queue("cargolint.webhooks.events", passive=True)
        dead = await channel.declare_queue("cargolint.webhooks.dead", passive=True)
        return (
            events.declaration_result.message_count or 0,
            dead.declaration_result.message_count or 0,
        )
    finally:
        await connection.close()


class StreamPublisher:
    """Publishes events at a steady rate with confirms, reconnecting through broker outages.

    A batch whose confirm was lost is published again: the engine must deliver an event id
    once however often it is published (docs/contract.md §2).
    """

    def __init__(
        self, amqp_url: str, events: list[dict[str, Any]], *, rate: float, batch: int = 50
    ) -> None:
        self.amqp_url = amqp_url
        self.events = events
        self.rate = rate
        self.batch = batch
        self.confirmed = 0
        self.republished = 0
        self.reconnects = 0
        self.done = asyncio.Event()

    async def run(self) -> None:
        connection: aio_pika.abc.AbstractConnection | None = None
        exchange: aio_pika.abc.AbstractExchange | None = None
        i = 0
        try:
            while i < len(self.events):
                try:
                    if connection is None or connection.is_closed:
                        connection = await aio_pika.connect(self.amqp_url, timeout=2)
                        channel = await connection.channel(publisher_confirms=True)
                        exchange = await channel.declare_exchange(
                            "cargolint.events", aio_pika.ExchangeType.TOPIC, durable=True
                        )
                    assert exchange is not None
                    chunk = self.events[i : i + self.batch]
                    async with asyncio.timeout(10):
                        await asyncio.gather(
                            *(
                                exchange.publish(
                                    aio_pika.Message(
                                        orjson.dumps(e),
                                        content_type="application/json",
                                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                    ),
                                    routing_key=e["event"],
                                )
                                for e in chunk
                            )
                        )
                    i += len(chunk)
                    self.confirmed = i
                    await asyncio.sleep(len(chunk) / self.rate)
                except Exception:  # the broker is down or going: reconnect, publish again
                    self.republished += self.batch
                    self.reconnects += 1
                    if connection is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(connection.close(), 2)
                    connection = None
                    await asyncio.sleep(0.3)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            self.done.set()

"""The chaos fixtures themselves: start, connect, restart, connect again, data kept."""

from __future__ import annotations

import asyncio

import aio_pika
import asyncpg
import pytest

from tests.chaos.services import TcpProxy, ThrowawayPostgres, ThrowawayRabbit, port_closed

# Starts and restarts throwaway Postgres and RabbitMQ servers.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarts_and_keeps_its_data(
    throwaway_pg: ThrowawayPostgres, mode: str
) -> None:
    assert throwaway_pg.port not in (5432,)
    conn = await asyncpg.connect(throwaway_pg.admin_url)
    await conn.execute("CREATE TABLE kept (n int)")
    await conn.execute("INSERT INTO kept VALUES (1), (2)")

    took = await asyncio.to_thread(throwaway_pg.restart, mode)
    assert took < 30
    with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
        await conn.fetchval("SELECT 1")  # the old connection did not survive
    conn.terminate()

    conn = await asyncpg.connect(throwaway_pg.admin_url)
    try:
        assert await conn.fetchval("SELECT sum(n) FROM kept") == 3
    finally:
        await conn.close()


async def test_postgres_stops_for_real(throwaway_pg: ThrowawayPostgres) -> None:
    await asyncio.to_thread(throwaway_pg.stop)
    assert port_closed(throwaway_pg.port)
    with pytest.raises(OSError):
        await asyncpg.connect(throwaway_pg.admin_url, timeout=2)
    await asyncio.to_thread(throwaway_pg.start)
    conn = await asyncpg.connect(throwaway_pg.admin_url)
    await conn.close()


async def test_rabbitmq_restarts_and_keeps_durable_queues_and_persistent_messages(
    throwaway_rabbit: ThrowawayRabbit,
) -> None:
    assert throwaway_rabbit.port != 5672
    connection = await aio_pika.connect(throwaway_rabbit.url)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue("chaos.kept", durable=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"persistent", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=queue.name,
    )
    await channel.default_exchange.publish(aio_pika.Message(b"transient"), routing_key=queue.name)
    await connection.close()

    took = await asyncio.to_thread(throwaway_rabbit.restart)
    print(f"rabbitmq start times: {throwaway_rabbit.start_seconds}")
    assert took < 60

    connection = await aio_pika.connect(throwaway_rabbit.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("chaos.kept", durable=True)
        message = await queue.get(timeout=5)
        assert message.body == b"persistent"
        await message.ack()
        assert await queue.get(fail=False) is None  # the transient one did not survive
    finally:
        await connection.close()


async def test_rabbitmq_kill_is_a_crash_and_it_comes_back(
    throwaway_rabbit: ThrowawayRabbit,
) -> None:
    await asyncio.to_thread(throwaway_rabbit.kill)
    assert port_closed(throwaway_rabbit.port)
    await asyncio.to_thread(throwaway_rabbit.start)
    connection = await aio_pika.connect(throwaway_rabbit.url)
    await connection.close()


async def test_the_proxy_passes_cuts_blocks_and_freezes(
    throwaway_pg: ThrowawayPostgres, pg_proxy: TcpProxy
) -> None:
    url = throwaway_pg.url("postgres", port=pg_proxy.port)
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT 41 + 1") == 42

    assert pg_proxy.cut() == 2  # both sockets of the one connection
    with pytest.raises((asyncpg.InterfaceError, OSError, asyncpg.PostgresConnectionError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()

    pg_proxy.block()
    with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        await asyncpg.connect(url, timeout=2)
    pg_proxy.restore()

    conn = await asyncpg.connect(url)
    pg_proxy.freeze()
    with pytest.raises(TimeoutError):
        await conn.fetchval("SELECT 1", timeout=0.5)
    pg_proxy.restore()
    conn.terminate()
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_the_proxy_drops_a_broker_connection(
    throwaway_rabbit: ThrowawayRabbit, rabbit_proxy: TcpProxy
) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{rabbit_proxy.port}/"
    connection = await aio_pika.connect_robust(url, reconnect_interval=0.2)
    reconnected = asyncio.Event()
    connection.reconnect_callbacks.add(lambda *_: reconnected.set())
    try:
        rabbit_proxy.cut()
        async with asyncio.timeout(15):
            await reconnected.wait()
        channel = await connection.channel()
        await channel.declare_queue("chaos.after-cut", auto_delete=True)
    finally:
        await connection.close()
    assert rabbit_proxy.connections >= 2

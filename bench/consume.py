"""The consuming floor: aio-pika alone taking the events a worker would take, nothing else done.

Runs in its own process, like `bench.limit`:

    python -m bench.consume --amqp-url U --count N

It consumes N messages already waiting in the engine's queue the way the worker does — a
robust connection, the worker's default prefetch, `Queue.consume` with a callback that only
buffers the message, one `ack(multiple=True)` per `ACK_EVERY` messages — and neither parses nor
stores them. It prints one JSON line: messages, seconds, messages/s and CPU µs per message.

Beside `bench.limit` (the plain aiohttp client's CPU per request), this is the part of a
delivery's cost that the two libraries the worker is built on take before any work of ours:
one process that only consumed with aio-pika and only sent with aiohttp would spend their sum
per delivery (docs/history.md reads the throughput ratio against it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.publisher import QUEUE
from bench.receiver import run
from engine.settings import Settings
from engine.worker.settling import ACK_EVERY

__all__ = ["consume", "main"]


async def consume(amqp_url: str, count: int) -> dict[str, float]:
    """Consume and ack `count` waiting messages; time them from the first."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=Settings().prefetch)
        queue = await channel.get_queue(QUEUE, ensure=True)
        taken = 0
        done = asyncio.Event()
        started = cpu_started = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal taken, started, cpu_started
            if taken == 0:
                started, cpu_started = time.perf_counter(), time.process_time()
            taken += 1
            if taken % ACK_EVERY == 0 or taken == count:
                await message.ack(multiple=True)
            if taken == count:
                done.set()

        tag = await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        await queue.cancel(tag)
    return {
        "messages": count,
        "seconds": elapsed,
        "rate": count / elapsed,
        "cpu_us_per_message": round(cpu / count * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.consume")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    result = run(consume(args.amqp_url, args.count))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ceiling: a plain aiohttp client loop POSTing signed 1 KiB bodies, no broker, no database.

Runs in its own process (like the worker) so the harness's own work does not share its loop:

    python -m bench.limit --url U --ca CA --concurrency C --count N

It builds and signs each body with the engine's own pure functions, as the worker must, and
prints one JSON line: requests, errors, seconds and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import ssl
import sys
import time

import aiohttp
import orjson

from bench.payload import EVENT_TYPE, SECRET, delivery_body
from bench.receiver import run
from engine.core.signing import request_headers

__all__ = ["hammer", "main"]

WEBHOOK_ID = "wh_benchlimit000001"


async def hammer(url: str, ca: str, concurrency: int, count: int, warmup: int) -> dict[str, float]:
    """POST `warmup` then `count` requests with `concurrency` loops; time the `count`."""
    context = ssl.create_default_context(cafile=ca)
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency, limit_per_host=0)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    )
    numbers = itertools.count()
    errors = 0

    async def loop(limit: int) -> None:
        nonlocal errors
        for n in numbers:
            if n >= limit:
                return
            delivery_id = f"dlv_limit{n:015d}"
            body = delivery_body(WEBHOOK_ID, delivery_id, time.time())
            headers = request_headers(
                secret=SECRET, body=body, event_type=EVENT_TYPE, delivery_id=delivery_id
            )
            try:
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

    async with session:
        await asyncio.gather(*(loop(warmup) for _ in range(concurrency)))
        numbers = itertools.count()
        errors = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        await asyncio.gather(*(loop(count) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    return {
        "requests": count,
        "errors": errors,
        "seconds": elapsed,
        "rps": count / elapsed,
        "cpu_us_per_request": round(cpu / count * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limit")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args(argv)
    result = run(hammer(args.url, args.ca, args.concurrency, args.count, args.warmup))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Acks: gathered over a few batches, sent within ACK_DELAY, and only after the writes."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from engine.settings import Settings
from engine.worker.main import Worker
from engine.worker.settling import ACK_DELAY
from engine.worker.topology import QUEUE
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    make_event,
    subscribed,
    wait_final,
)


def queue_counts(amqp_url: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages on the events queue, straight from the broker."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split()
        if name == QUEUE:
            return int(ready), int(unacked)
    raise AssertionError(f"no queue {QUEUE} in {out!r}")


@pytest.mark.slow
async def test_paced_messages_are_all_acked_soon_after_their_writes(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    account, webhook_id, _ = await subscribed(worker, pool, wsettings, receiver.url)
    events = [make_event(account) for _ in range(30)]
    for event in events:
        await publisher.publish(event)
        await asyncio.sleep(0.003)  # batches of one or two, as at a paced rate

    rows = await wait_final(pool, [dlv(webhook_id, account, e) for e in events])
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    await asyncio.sleep(ACK_DELAY * 5)
    counts = await asyncio.to_thread(queue_counts, wsettings.amqp_url)
    assert counts == (0, 0)

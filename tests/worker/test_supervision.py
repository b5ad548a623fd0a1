"""An ack or reject caught by its connection's close is not an error: the broker redelivers."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from aiormq.abc import DeliveredMessage

from engine.worker.consumer import _ack, _nack


async def _one_message(amqp_url: str) -> tuple[aiormq.abc.AbstractConnection, DeliveredMessage]:
    """A connection and a message delivered on it, not yet acked."""
    connection = await aiormq.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.queue_declare("", exclusive=True)
    await channel.basic_publish(b"{}", routing_key=queue.queue)
    delivered: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()
    await channel.basic_consume(queue.queue, delivered.set_result)
    return connection, await delivered


@pytest.mark.parametrize("settle", [_ack, _nack])
@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_an_ack_caught_by_its_connections_close_is_not_an_error(
    amqp_url: str, settle: Any, turns: int
) -> None:
    # The frame is queued, its connection closes before it is written: aiormq fails the wait with
    # the close's reason — CancelledError or a bare Exception, found here at 0 and 1 turns — and
    # that once ended the consuming loop. The broker redelivers the message: nothing to do.
    connection, message = await _one_message(amqp_url)
    settling = asyncio.create_task(settle([message]))
    for _ in range(turns):
        await asyncio.sleep(0)
    await connection.close()
    await asyncio.wait_for(settling, 10)  # returns, whatever the turn the close came at
    assert message.channel.is_closed


async def test_cancelling_an_ack_still_cancels_it(amqp_url: str) -> None:
    connection, message = await _one_message(amqp_url)
    try:
        settling = asyncio.create_task(_ack([message]))
        await asyncio.sleep(0)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
    finally:
        await connection.close()

"""The engine's exchanges and queues on RabbitMQ, declared idempotently (docs/contract.md §2).

`cargolint.events` (topic) is bound with `#` to `cargolint.webhooks.events`, so a message of an
unknown type is seen and dead-lettered rather than lost; dead letters go through
`cargolint.events.dlx` to `cargolint.webhooks.dead`.

Classic queues (the default) are declared with no arguments at all, so a publisher that
declares the queue plainly first never conflicts. Quorum queues (`CARGOLINT_QUEUE_TYPE=quorum`)
carry `x-queue-type: quorum`; RabbitMQ refuses to declare a queue again as another type, and
that refusal is turned into `QueueConflictError`, a one-line message for the operator.
"""

from __future__ import annotations

import re
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "EXCHANGE",
    "QUEUE",
    "QueueConflictError",
    "declare_topology",
    "existing_queue_type",
]

EXCHANGE = "cargolint.events"
QUEUE = "cargolint.webhooks.events"
DEAD_EXCHANGE = "cargolint.events.dlx"
DEAD_QUEUE = "cargolint.webhooks.dead"

# What RabbitMQ says the queue has when it refuses another `x-queue-type`:
# "… but current is none", "… but current is 'quorum'", "… current is the value 'quorum' of …".
_CURRENT = re.compile(r"current is (?:none|(?:the value )?'(\w+)')")


class QueueConflictError(RuntimeError):
    """A queue exists on the broker with other properties than the worker declares."""

    def __init__(self, queue: str, message: str) -> None:
        super().__init__(message)
        self.queue = queue


def existing_queue_type(reply: str) -> str | None:
    """The type of the existing queue named in RabbitMQ's refusal of an `x-queue-type`, or None
    when the refusal is about something else. No `x-queue-type` at all is a classic queue."""
    if "'x-queue-type'" not in reply:
        return None
    found = _CURRENT.search(reply)
    if found is None:
        return None
    return found.group(1) or "classic"


def _conflict(
    queue: str, queue_type: str, refusal: ChannelPreconditionFailed
) -> QueueConflictError:
    reply = str(refusal.args[0]) if refusal.args else str(refusal)
    existing = existing_queue_type(reply)
    if existing is None:
        return QueueConflictError(
            queue, f"queue {queue} exists with other arguments than the worker declares: {reply}"
        )
    if queue_type == "quorum":
        hint = "see the README on moving to quorum"
    else:
        hint = f"set CARGOLINT_QUEUE_TYPE={existing} to use it, or see the README on queue types"
    return QueueConflictError(queue, f"queue {queue} exists as a {existing} queue; {hint}")


async def _declare_queue(channel: AbstractChannel, name: str, queue_type: str) -> AbstractQueue:
    # Classic: no arguments at all (see the module's docstring).
    arguments: dict[str, Any] | None = None
    if queue_type != "classic":
        arguments = {"x-queue-type": queue_type}
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        raise _conflict(name, queue_type, exc) from None


async def declare_topology(
    channel: AbstractChannel, queue_type: str = "classic"
) -> tuple[AbstractQueue, AbstractExchange]:
    """Declare the exchanges and queues; return the events queue and the dead-letter exchange.

    Raise `QueueConflictError` when a queue exists as another type (the channel is then closed
    by the broker).
    """
    events = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await _declare_queue(channel, QUEUE, queue_type)
    await queue.bind(events, routing_key="#")
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_queue = await _declare_queue(channel, DEAD_QUEUE, queue_type)
    await dead_queue.bind(dead, routing_key="#")
    return queue, dead

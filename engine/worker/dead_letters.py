"""Dead-lettering: a message the worker cannot record goes to the dead-letter exchange, never away.

The copy keeps the original body and properties, made persistent, with the reason in
`x-cargolint-reason`. It is published on a confirming channel of its own, so it is safely there
before the original is acked, and waiting for a confirm never stalls deliveries arriving on the
consuming channel.
"""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from engine.core.events import InvalidEventError
from engine.worker.metrics import Metrics
from engine.worker.topology import DEAD_EXCHANGE

__all__ = ["REASON_HEADER", "STORE_REJECTED", "DeadLetters"]

log = logging.getLogger(__name__)

# Dead-letter reason of a message whose event Postgres refuses to store (`REJECTED`).
STORE_REJECTED = "store_rejected"
REASON_HEADER = "x-cargolint-reason"


class DeadLetters:
    """Publishes dead letters once `open`: `publish(message, error)`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._exchange: AbstractExchange | None = None

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Open the confirming channel and declare the dead-letter exchange on it."""
        channel = await connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(
            DEAD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def publish(self, message: AbstractIncomingMessage, error: InvalidEventError) -> None:
        """Publish a copy of `message` with `error` as its reason, and wait for the confirm."""
        assert self._exchange is not None  # noqa: S101 - set by open()
        reason = f"{error.reason}: {error.detail}"[:1000]
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        # The original body and properties, made persistent. Not user_id (the broker checks it
        # against our login) nor expiration (a dead letter must not vanish).
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        await self._exchange.publish(copy, routing_key=message.routing_key or "")
        self._metrics.events_dead_lettered_by(error.reason).inc()
        log.warning(
            "message dead-lettered",
            extra={"reason": reason, "routing_key": message.routing_key},
        )

"""Settling consumed messages with the broker: acks gathered per channel, rejects back to the queue.

A message is acked once its effects are durable: one multiple-ack per channel covers this batch
and the ones before it, once `ACK_EVERY` messages wait or `ACK_DELAY` after the first — at a
paced rate batches are a message or two, and an ack each would cost the broker and us more
than the rest of it. A multiple-ack covers every earlier delivery tag of its channel, so it
goes no further than the tags settled without a gap (`engine.worker.acks.AckWindow`).

An ack or reject whose channel went away meanwhile needs nothing more: the broker redelivers
what was not acked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPConnectionError, ChannelInvalidStateError

from engine.worker.acks import AckWindow

__all__ = ["ACK_DELAY", "ACK_EVERY", "BROKER_LOST", "Acks", "being_cancelled", "settle"]

log = logging.getLogger(__name__)

# Acks wait for company this long at most (they hold prefetch slots meanwhile, nothing else).
ACK_DELAY = 0.02
ACK_EVERY = 200
# A delivery tag still missing this long after later ones were done: ack those one by one.
ACK_GAP_PATIENCE = 5.0

# The broker went away under us: the messages not acked will be redelivered.
BROKER_LOST = (ChannelInvalidStateError, AMQPConnectionError, ConnectionError)


class Acks:
    """The consumed messages whose effects are durable, to be acked, by their channel.

    `ready` says when to `flush`; `arm` starts the `ACK_DELAY` timer, which calls `wake` (the
    consuming loop then flushes).
    """

    def __init__(self, *, prefetch: int, wake: Callable[[], None]) -> None:
        self._windows: dict[Any, AckWindow[AbstractIncomingMessage]] = {}
        self._unacked = 0
        self._every = max(1, min(ACK_EVERY, prefetch // 4))
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        self._wake = wake

    @property
    def ready(self) -> bool:
        """Whether enough messages wait, or the first has waited long enough."""
        return self._due or self._unacked >= self._every

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the messages that wait flushed `ACK_DELAY` from now at the latest."""
        if self._unacked and self._timer is None:
            self._timer = loop.call_later(ACK_DELAY, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._due = True
        self._wake()

    def done(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """The batch's effects are durable: its messages are to be acked."""
        for message in batch:
            window = self._window(message)
            if window is not None and message.delivery_tag is not None:
                window.done(message.delivery_tag, message)
                self._unacked += 1

    async def reject(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Reject `batch` back to the queue, to be delivered again."""
        for message in batch:
            window = self._window(message)
            if window is None or message.delivery_tag is None:
                continue
            window.returned(message.delivery_tag)
            await settle(message, ack=False)

    async def flush(self) -> None:
        """Ack what is done: a multiple-ack per channel up to its first gap (see AckWindow)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = False
        now = asyncio.get_running_loop().time()
        for channel, window in list(self._windows.items()):
            if channel.is_closed:
                del self._windows[channel]  # its messages are redelivered
                continue
            last, alone = window.take(now)
            if alone:
                log.warning(
                    "a delivery never reached the consumer; acking later ones one by one",
                    extra={"delivery_tag": window.gap, "messages": len(alone)},
                )
            for message in alone:
                await settle(message, ack=True)
            if last is not None:
                await settle(last, ack=True, multiple=True)
        self._unacked = sum(len(window) for window in self._windows.values())

    def _window(
        self, message: AbstractIncomingMessage
    ) -> AckWindow[AbstractIncomingMessage] | None:
        """The acks of the channel `message` came on; None once that channel is closed (the
        broker then redelivers the message: nothing to ack)."""
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return None
        window = self._windows.get(channel)
        if window is None:
            window = self._windows[channel] = AckWindow(ACK_GAP_PATIENCE)
        return window


async def settle(message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False) -> None:
    """Ack `message` (with every earlier one of its channel when `multiple`), or reject it back
    to the queue; nothing to do when its channel went away meanwhile."""
    try:
        if ack:
            await message.ack(multiple=multiple)
        else:
            await message.reject(requeue=True)
    except BaseException as exc:
        if not _gone_with_channel(exc, message):
            raise


def _gone_with_channel(exc: BaseException, message: AbstractIncomingMessage) -> bool:
    """Whether `exc`, raised by an ack or reject of `message`, only says its channel went away:
    the broker then redelivers the messages, so there is nothing more to do.

    A frame still waiting to be written when its connection closes fails with whatever the
    close carries: a connection error, a bare `Exception`, or `CancelledError` — which is then not
    this task being cancelled, and must not end it (it once ended the consuming loop, silently).
    """
    if isinstance(exc, BROKER_LOST):
        return True
    if isinstance(exc, asyncio.CancelledError) and being_cancelled():
        return False
    return isinstance(exc, Exception | asyncio.CancelledError) and _channel_closed(message)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 - aio-pika raises here once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


def being_cancelled() -> bool:
    """Whether the running task is being cancelled (rather than handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

"""Which messages of one AMQP channel one multiple-ack may cover.

A multiple-ack of delivery tag T acknowledges every message of its channel up to T, so it may
only be sent once every message up to T is done with. Tags count the channel's deliveries from
1, one by one; the client library hands messages to the consumer in tasks of their own, so the
order they are processed in is not a promise we lean on. `AckWindow` keeps the tags settled so
far and answers with the highest tag below which nothing is left unsettled.

A tag that never reaches the consumer (a message the library could not hand on) would hold
every later ack back, and with them the prefetch window: after `patience` seconds the messages
waiting behind it are acked one by one instead, and the missing one is left to the broker,
which redelivers it when the channel closes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["AckWindow"]

M = TypeVar("M")


class AckWindow(Generic[M]):
    """The delivery tags of one channel: which are done, and which one ack covers them."""

    __slots__ = ("_hole", "_hole_since", "_ready", "_settled", "acked_through", "patience")

    def __init__(self, patience: float) -> None:
        self.patience = patience
        # Every tag up to this one is acked or returned to the queue.
        self.acked_through = 0
        self._ready: dict[int, M] = {}  # done with, not yet acked
        self._settled: set[int] = set()  # past a gap: acked alone, or returned
        self._hole: int | None = None  # the first tag not seen while later ones wait
        self._hole_since = 0.0

    def __len__(self) -> int:
        """How many messages wait for an ack."""
        return len(self._ready)

    def done(self, tag: int, message: M) -> None:
        """`message` (delivery tag `tag`) is done with: its effects are durable."""
        if tag > self.acked_through:
            self._ready[tag] = message

    def returned(self, tag: int) -> None:
        """The message with `tag` went back to the queue (rejected): nothing to ack."""
        if tag > self.acked_through:
            self._ready.pop(tag, None)
            self._settled.add(tag)

    def take(self, now: float) -> tuple[M | None, list[M]]:
        """What to ack now: the message whose multiple-ack covers every done message with no
        gap below it (or None), and those to ack one by one, held too long behind a gap."""
        through = self.acked_through
        last: M | None = None
        while True:
            following = through + 1
            if following in self._ready:
                last = self._ready.pop(following)
            elif following in self._settled:
                self._settled.discard(following)
            else:
                break
            through = following
        self.acked_through = through
        alone: list[M] = []
        if not self._ready and not self._settled:
            self._hole = None
        elif self._hole != through + 1:
            self._hole, self._hole_since = through + 1, now
        elif self._ready and now - self._hole_since >= self.patience:
            alone = list(self._ready.values())
            self._settled.update(self._ready)
            self._ready.clear()
        return last, alone

    @property
    def gap(self) -> int | None:
        """The tag missing below messages that wait, if any (for the log)."""
        return self._hole

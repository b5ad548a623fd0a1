"""A job: one delivery attempt to make, as the consumer and the poller hand it on."""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.events import Event

__all__ = ["Job"]


@dataclass(slots=True)
class Job:
    """One delivery attempt to make: `attempt` is its number (1 for the first).

    `received_at` is the loop time the event arrived, for the event-to-first-attempt metric;
    None for retries and deliveries taken over from another worker. `retry_base` is the number
    of attempts made before the delivery's current retry schedule began (a resend starts a
    fresh one): the schedule's step is `attempt - retry_base`.
    """

    delivery_id: str
    webhook_id: str
    event: Event
    attempt: int
    received_at: float | None = None
    retry_base: int = 0

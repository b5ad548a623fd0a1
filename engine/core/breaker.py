"""An endpoint's failure streak, with `now` passed in.

After `TRIP` failed attempts in a row an endpoint is *failing*. While it is, and while its
worker is behind on its work, it may start only one attempt per pause — a pause that doubles
per further failure (from `FIRST_PAUSE`) up to `cap` — until an attempt succeeds: an endpoint
that answers 500 in a millisecond then costs the busy worker little, and the work it yields to
is everybody else's. Only the pace changes: every attempt made is a real attempt of a real
delivery, counted and scheduled as usual, and a worker with time to spare keeps the schedule.
"""

from __future__ import annotations

__all__ = ["FIRST_PAUSE", "MAX_PARK", "MIN_PARK", "TRIP", "Breaker"]

TRIP = 5
FIRST_PAUSE = 0.05
# Deliveries beyond what a failing endpoint holds in memory wait in Postgres this long (bounds).
MIN_PARK = 5.0
MAX_PARK = 600.0


class Breaker:
    """Consecutive failures of one endpoint and when it may be attempted again."""

    __slots__ = ("cap", "failing_since", "failures", "resume_at")

    def __init__(self, cap: float) -> None:
        if cap <= 0:
            raise ValueError("cap must be > 0")
        self.cap = cap
        self.failures = 0
        self.failing_since = 0.0  # when the streak reached TRIP
        self.resume_at = 0.0

    @property
    def tripped(self) -> bool:
        return self.failures >= TRIP

    def succeeded(self) -> None:
        self.failures = 0
        self.resume_at = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures == TRIP:
            self.failing_since = now

    @property
    def pause(self) -> float:
        """The spacing of attempt starts while paced (0.0 while not failing)."""
        if not self.tripped:
            return 0.0
        doublings = min(self.failures - TRIP, 32)  # no float overflow on a long streak
        return min(self.cap, FIRST_PAUSE * 2.0**doublings)

    def started(self, now: float) -> None:
        """An attempt started now: while paced, the next one waits a pause."""
        self.resume_at = now + self.pause

    def wait(self, now: float) -> float:
        """Seconds before the next attempt may start when paced (0.0: now)."""
        return max(0.0, self.resume_at - now)

    def park_for(self, now: float) -> float:
        """How long a delivery the failing endpoint has no room for waits in Postgres.

        As long as the endpoint has been failing (a burst of failures in one second is not a
        dead endpoint), so a long-dead endpoint's backlog is not cycled through memory every few
        seconds; bounded, so a recovered endpoint gets it soon enough.
        """
        return min(MAX_PARK, max(MIN_PARK, now - self.failing_since))

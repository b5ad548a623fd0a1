"""An endpoint's failure streak, with `now` passed in.

After `TRIP` failed attempts in a row an endpoint is *failing*, until an attempt succeeds. While
its worker is behind on its work, a failing endpoint may start only one attempt per pause — a
pause that doubles per further failure (from `FIRST_PAUSE`) up to `cap`: an endpoint that
answers 500 in a millisecond then costs the busy worker little, and the work it yields to is
everybody else's. With time to spare it keeps its schedule, but starts at most `FAILING_RATE`
attempts a second, `FAILING_BURST` at once: a backlog of retries that come due together — a
dead endpoint's parked deliveries, a burst of first attempts five seconds earlier — is spread
out instead of taking the worker's CPU from everyone at once. Only the pace changes: every attempt
made is a real attempt of a real delivery, counted and scheduled as usual.
"""

from __future__ import annotations

from engine.core.ratelimit import TokenBucket

__all__ = [
    "FAILING_BURST",
    "FAILING_RATE",
    "FIRST_PAUSE",
    "MAX_PARK",
    "MIN_PARK",
    "TRIP",
    "Breaker",
]

TRIP = 5
FIRST_PAUSE = 0.05
# Attempt starts a second of a failing endpoint while the worker has time: the default
# per-endpoint rate, so it binds only where an operator raised that rate for a receiver.
FAILING_RATE = 100.0
# ... and how many may start at once. A burst of 100 — each failing endpoint's, as the worker
# stopped being behind — sat in the isolation benchmark's slowest paced seconds; with 5 its
# healthy p99 was 69, 32, 75 ms against 102, 32, 193 in interleaved runs.
FAILING_BURST = 5.0
# Deliveries beyond what a failing endpoint holds in memory wait in Postgres this long (bounds).
MIN_PARK = 5.0
MAX_PARK = 600.0


class Breaker:
    """Consecutive failures of one endpoint and when it may be attempted again."""

    __slots__ = ("_budget", "cap", "failing_since", "failures", "resume_at")

    def __init__(self, cap: float) -> None:
        if cap <= 0:
            raise ValueError("cap must be > 0")
        self.cap = cap
        self.failures = 0
        self.failing_since = 0.0  # when the streak reached TRIP
        self.resume_at = 0.0
        self._budget = TokenBucket(FAILING_RATE, FAILING_BURST, 0.0)

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
            self._budget = TokenBucket(FAILING_RATE, FAILING_BURST, now)

    @property
    def pause(self) -> float:
        """The spacing of attempt starts while paced (0.0 while not failing)."""
        if not self.tripped:
            return 0.0
        doublings = min(self.failures - TRIP, 32)  # no float overflow on a long streak
        return min(self.cap, FIRST_PAUSE * 2.0**doublings)

    def started(self, now: float) -> None:
        """An attempt started now: the next one waits a pause while behind, and it counts."""
        self.resume_at = now + self.pause
        if self.tripped:
            self._budget.spend(now)

    def wait(self, now: float, *, behind: bool) -> float:
        """Seconds before the next attempt may start (0.0: now).

        While failing: a pause after the last start when the worker is `behind`, else as long
        as it takes to stay within `FAILING_RATE`.
        """
        if not self.tripped:
            return 0.0
        if behind:
            return max(0.0, self.resume_at - now)
        return self._budget.wait(now)

    def park_for(self, now: float, *, spread: float = 0.0) -> float:
        """How long a delivery the failing endpoint has no room for waits in Postgres.

        As long as the endpoint has been failing (a burst of failures in one second is not a
        dead endpoint), so a long-dead endpoint's backlog is not cycled through memory every few
        seconds; bounded, so a recovered endpoint gets it soon enough. `spread` (0 to 1, the
        caller's random draw) lengthens it by up to a half, so deliveries parked together do
        not all come due together.
        """
        base = min(MAX_PARK, max(MIN_PARK, now - self.failing_since))
        return min(MAX_PARK, base * (1.0 + spread / 2.0))

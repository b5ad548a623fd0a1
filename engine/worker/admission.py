"""Admission: each endpoint's state, and the arithmetic of what it may start and hold.

Every endpoint (scheme + host + port) has its own in-memory queue, token bucket, concurrency
limit and breaker (`Endpoint`). While global slots are in demand, each failure halves its
concurrency and each success adds one back (`Endpoint.cap`): an endpoint that hangs or fails
soon holds a single slot. An account that holds three quarters of the global slots while
another account has work waiting yields the rest to it (`Shares`).

What endpoints hold in memory is bounded (`Holds`): a failing endpoint at most `each` jobs (the
ones beyond are parked in Postgres, due later), any other at most `busy`, half the worker's
capacity (the rest wait in Postgres, due, and are claimed as it makes room), and each endpoint
may always hold `FLOOR` jobs however full the worker is: a deep backlog at one endpoint never
stands in front of another's deliveries.

Plain data and arithmetic, `now` passed in; the dispatcher does the I/O.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from engine.core.breaker import Breaker
from engine.core.ratelimit import TokenBucket
from engine.worker.job import Job

__all__ = ["FLOOR", "Endpoint", "Holds", "Shares", "endpoint_key"]

_DEFAULT_PORTS = {"https": 443, "http": 80}
# Jobs an endpoint may always hold in memory, however full the worker is: a newcomer's first
# deliveries are never left in Postgres because other endpoints filled the hold.
FLOOR = 16


def endpoint_key(url: str) -> str:
    """`https://host:port`: deliveries sharing it share the endpoint's limits."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


class Endpoint:
    """One endpoint's queue, limits and bookkeeping in this worker."""

    __slots__ = (
        "active",
        "backlog",
        "breaker",
        "bucket",
        "in_line",
        "key",
        "last_used",
        "limit",
        "parked",
        "queue",
        "timer",
    )

    def __init__(
        self, key: str, bucket: TokenBucket, breaker: Breaker, now: float, limit: int
    ) -> None:
        self.key = key
        self.queue: deque[Job] = deque()
        self.active = 0
        self.limit = limit  # attempts it may have in flight while slots are in demand: `cap`
        self.bucket = bucket
        self.breaker = breaker
        self.timer: asyncio.TimerHandle | None = None  # set while it waits for a token or pause
        self.in_line = False  # while it waits for a global slot (the dispatcher's line)
        self.last_used = now
        self.parked: set[str] = set()  # webhooks whose jobs it parked since it last succeeded
        self.backlog = False  # due deliveries of it wait in Postgres for room here

    def idle(self, now: float, idle_for: float) -> bool:
        """Nothing queued or in flight, and unused for `idle_for` seconds."""
        return not self.queue and not self.active and now - self.last_used > idle_for

    def cap(self, running: int, max_in_flight: int, concurrency: int) -> int:
        """How many attempts the endpoint may have in flight now, `running` of the worker's
        `max_in_flight` being under way.

        Its own `limit` while global slots are in demand (half of them taken or more); while
        they are not, a failing endpoint may use its configured `concurrency`: slots nobody
        else wants cost no one anything.
        """
        if running * 2 < max_in_flight:
            return concurrency
        return self.limit

    # Additive increase, multiplicative decrease of the endpoint's concurrency: an endpoint
    # that fails or hangs soon has a single attempt in flight while slots are in demand
    # (`cap`), so it holds one global slot rather than `concurrency` of them and its backlog
    # waits in its own queue; each success gives a slot back, up to the configured
    # concurrency. The breaker counts the streak of failures that pauses it.

    def succeeded(self, concurrency: int) -> None:
        """An attempt of it succeeded: one more slot, up to `concurrency`."""
        self.breaker.succeeded()
        self.parked.clear()
        if self.limit < concurrency:
            self.limit += 1

    def failed(self, now: float) -> None:
        """An attempt of it failed: half the slots, down to one."""
        self.breaker.failed(now)
        if self.limit > 1:
            self.limit //= 2


class Holds:
    """How many jobs endpoints may hold in memory, within the worker's `capacity`.

    A failing endpoint holds at most `each` (beyond it they are parked in Postgres, due later),
    any other at most `busy` (beyond it they stay in Postgres, due, and are claimed as it makes
    room).
    """

    __slots__ = ("busy", "capacity", "each")

    def __init__(self, max_in_flight: int) -> None:
        # Beyond the capacity new work stays in Postgres for the poller.
        self.capacity = max(10_000, 20 * max_in_flight)
        self.each = self.capacity // 20
        self.busy = self.capacity // 2

    def of(self, ep: Endpoint | None) -> int:
        """How many jobs the endpoint may hold in memory."""
        return self.each if ep is not None and ep.breaker.tripped else self.busy

    def has_room(self, ep: Endpoint | None, queued: int, room: int) -> bool:
        """Whether the endpoint, `queued` jobs held, may take one more: within its own bound,
        and within the worker's (`room`) unless it holds fewer than FLOOR."""
        return queued < self.of(ep) and (room > 0 or queued < FLOOR)

    def full(self, ep: Endpoint) -> bool:
        """Whether a failing endpoint holds all it may in memory (the rest is parked)."""
        return ep.breaker.tripped and len(ep.queue) >= self.each

    def holds_back(self, ep: Endpoint) -> bool:
        """Whether a failing endpoint that parked deliveries still holds at least half of what
        it may: claimed, its due deliveries would only be parked again."""
        return bool(ep.parked) and ep.breaker.tripped and len(ep.queue) >= self.each // 2

    def wants(
        self, held: Collection[str], endpoints: Mapping[str, Endpoint], room: int
    ) -> dict[str, int]:
        """How many due deliveries of each of the `held` endpoints may be claimed, the worker
        having `room` for more jobs.

        Each up to what the endpoint may hold in memory, a fair share of the worker's room at
        least, and none for an endpoint that `holds_back`. Such an endpoint's deliveries are
        claimed as usual once it is down to half (what does not fit is parked again: once per
        half a queue, not once per attempt) or has recovered.
        """
        share = max(FLOOR, room // max(1, len(held)))
        wants: dict[str, int] = {}
        for key in held:
            ep = endpoints.get(key)
            queued = len(ep.queue) if ep is not None else 0
            if ep is not None and self.holds_back(ep):
                continue
            want = min(self.of(ep) - queued, share, max(room, FLOOR - queued))
            if want > 0:
                wants[key] = want
                room = max(0, room - want)
        return wants


class Shares:
    """Per account: attempts in flight, and jobs held here (queued or in flight).

    An account holds its share of the global slots at three quarters of them: while another
    account has work here, the rest is kept for that work. Alone, an account may use every slot.
    """

    __slots__ = ("_load", "_running", "share")

    def __init__(self, max_in_flight: int) -> None:
        self.share = max(1, max_in_flight * 3 // 4)
        self._running: Counter[str] = Counter()
        self._load: Counter[str] = Counter()

    def over(self, account: str, held: int) -> bool:
        """Whether the account holds its share while others have work among the `held` jobs."""
        return self._running[account] >= self.share and self._load[account] < held

    def queued(self, account: str) -> None:
        """One of the account's jobs came to this worker."""
        self._load[account] += 1

    def started(self, account: str) -> None:
        """One of the account's attempts started."""
        self._running[account] += 1

    def ended(self, account: str) -> None:
        """One of the account's attempts ended, and with it its job here."""
        self._running[account] -= 1
        if not self._running[account]:
            del self._running[account]
        self.left(account)

    def left(self, account: str) -> None:
        """One of the account's jobs left this worker (ended, or went back to Postgres)."""
        self._load[account] -= 1
        if not self._load[account]:
            del self._load[account]

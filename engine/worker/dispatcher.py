"""Dispatching: jobs queued per endpoint, their attempts started within the limits.

Every endpoint (scheme + host + port) has its own in-memory queue, token bucket and
concurrency limit (`engine.worker.admission`), and no task of its own: the end of one of its
attempts, a timer (for a token or a pause) or a global slot handed on in line order starts its
next attempts. A job leaves its queue only when its endpoint has a token and a free slot and a
global in-flight slot is free, so an endpoint that hangs or fails holds at most
`endpoint_concurrency` slots — soon just one while slots are in demand — and the rest of its
backlog waits in its own queue (acked already, durable in Postgres) and delays nobody else.

An endpoint whose last attempts all failed is *failing* (`engine.core.breaker`). While the
worker is `behind` (its consumer has a backlog), a failing endpoint starts one attempt per
pause, a pause that grows per failure, until one succeeds: a receiver that answers 500 at once
then costs the busy worker little more than one that hangs, and the time goes to everybody
else. With time to spare, retries keep their schedule, at most `FAILING_RATE` attempt starts a
second, so retries that come due together do not all take the CPU at once. A failing endpoint
holds a bounded number of jobs in memory and parks the rest in Postgres (`Holds`, `park`).

The worker sends only to endpoints whose lease it holds, and claims only what it has room for
(`engine.worker.claims`); each attempt is made by `engine.worker.attempt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from engine.core.breaker import Breaker
from engine.core.ratelimit import TokenBucket
from engine.delivery import Sender
from engine.settings import Settings
from engine.worker.admission import Endpoint, Holds, Shares, endpoint_key
from engine.worker.attempt import AttemptRunner
from engine.worker.cache import SubscriptionCache
from engine.worker.claims import LeaseTaker, Placement, park, placements
from engine.worker.job import Job
from engine.worker.leases import Leases
from engine.worker.metrics import Metrics
from engine.worker.recorder import Recorder

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# Idle endpoints are forgotten after this long, once their bucket would be full again anyway.
_SWEEP_INTERVAL = 30.0
# While the leases wait for a heartbeat to get through, a held endpoint looks again this often.
_LEASE_RECHECK = 0.1


class Dispatcher:
    """Queues jobs per endpoint and makes their attempts within the limits."""

    def __init__(
        self,
        settings: Settings,
        *,
        cache: SubscriptionCache,
        sender: Sender,
        recorder: Recorder,
        metrics: Metrics,
        leases: Leases,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._leases = leases
        self._cache = cache
        self._recorder = recorder
        self._metrics = metrics
        self._clock = clock
        self._runner = AttemptRunner(
            cache=cache, sender=sender, recorder=recorder, metrics=metrics, ended=self._ended
        )
        self._lease_taker = LeaseTaker(leases, clock=clock)
        self._endpoints: dict[str, Endpoint] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._running = 0  # attempts started and not yet ended (the tasks' set lags a little)
        # Endpoints that could start an attempt but for a free global slot, in the order they
        # asked: each freed slot goes to the first of them.
        self._line: deque[Endpoint] = deque()
        self._shares = Shares(settings.max_in_flight)
        self._queued = 0
        self._stopping = False
        self._keys: dict[str, str] = {}  # url → endpoint key, so hot paths skip urlsplit
        # Deliveries this worker holds in memory, from submit until their outcome is written.
        self.held: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # Bounds on the jobs held in memory, the worker's and each endpoint's.
        self.holds = Holds(settings.max_in_flight)
        # The longest pause between a failing endpoint's attempts: at most a second, and never
        # longer than the first retry's wait, so a short schedule is not stretched much.
        self._pause_cap = max(0.01, min(1.0, *settings.retry_schedule[:1]))
        # Set when an endpoint with deliveries waiting in Postgres has room for more: the poller
        # claims then rather than at its next turn, so a backlog flows without gaps.
        self.room_for_backlog = asyncio.Event()
        # Whether the worker is behind on its work (set by the worker: the consumer's backlog).
        self.behind: Callable[[], bool] = lambda: False
        # Read when scraped, not set per attempt.
        metrics.in_flight.set_function(lambda: self._running)
        metrics.queued.set_function(lambda: self._queued)
        metrics.endpoints_failing.set_function(
            lambda: sum(1 for ep in self._endpoints.values() if ep.breaker.tripped)
        )

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._running

    def room(self) -> int:
        """How many more jobs may be held in memory now."""
        return max(0, self.holds.capacity - self._queued - self._running)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="dispatcher-sweep")

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The sweeper, while started: it runs until `drain()`."""
        return (self._sweeper,) if self._sweeper is not None else ()

    def submit(self, jobs: Iterable[Job]) -> None:
        """Queue jobs on their endpoints; a job whose webhook is gone ends at once."""
        for job in jobs:
            if job.delivery_id in self.held:
                continue  # already here (a redelivered message, a second claim)
            self.held.add(job.delivery_id)
            target = self._cache.get(job.webhook_id)
            if target is None:
                self._recorder.gone(job)
                continue
            self._enqueue(self._key(target.url), job)

    def forget(self, delivery_ids: Iterable[str]) -> None:
        """The outcomes of these deliveries are written: they are no longer held here."""
        self.held.difference_update(delivery_ids)

    def _key(self, url: str) -> str:
        key = self._keys.get(url)
        if key is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            key = self._keys[url] = endpoint_key(url)
        return key

    def _endpoint(self, key: str, now: float) -> Endpoint:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            rate = self._settings.endpoint_rate
            bucket = TokenBucket(rate, max(1.0, rate), now)
            limit = self._settings.endpoint_concurrency
            breaker = Breaker(self._pause_cap)
            endpoint = self._endpoints[key] = Endpoint(key, bucket, breaker, now, limit)
        return endpoint

    def _enqueue(self, key: str, job: Job) -> None:
        if not self._leases.holds(key):
            # Another worker sends to this endpoint (or nobody, for now): the holder of its
            # lease claims the delivery from Postgres.
            self._recorder.hand_back(job, key)
            return
        now = self._clock()
        endpoint = self._endpoint(key, now)
        if self.holds.full(endpoint):
            self._recorder.park(job, park(endpoint, job.webhook_id, now))
            return
        endpoint.queue.append(job)
        endpoint.last_used = now
        self._queued += 1
        self._shares.queued(job.event.account_id)
        if len(endpoint.queue) == 1:
            # A queue that had work is waiting already: for a slot of its own, a token or the
            # end of a pause (a timer), or a global slot (the line); each of them starts it.
            self._start(endpoint)

    async def place(self, deliveries: Iterable[tuple[str, str]]) -> dict[str, Placement]:
        """Where each of these (delivery id, webhook id) pairs about to be created goes.

        Claimed by this worker if it sends to the endpoint — it holds the lease, or takes it
        now that nobody does — and the endpoint and the worker have room; else unclaimed, for
        the lease holder's poller. A failing endpoint that holds all it may in memory has its
        new deliveries created parked: queued they would only be parked again (`_enqueue`).
        """
        pairs = list(deliveries)
        keys: dict[str, str] = {}
        for delivery_id, webhook_id in pairs:
            target = self._cache.get(webhook_id)
            if target is not None:
                keys[delivery_id] = self._key(target.url)
        await self.lease(keys.values())
        return placements(
            pairs,
            keys,
            endpoints=self._endpoints,
            holds=self.holds,
            room=self.room(),
            leased=self._leases.holds,
            now=self._clock(),
        )

    async def lease(self, endpoints: Iterable[str]) -> set[str]:
        """Take the leases of those endpoints nobody holds; return the ones taken.

        A new holder starts with an empty token bucket unless the endpoint was quiet — its
        previous holder released it long enough ago for a full bucket — so the handover never
        sends more than one bucket would.
        """
        taken = await self._lease_taker.take(endpoints)
        now = self._clock()
        for key, quiet in taken.items():
            ep = self._endpoint(key, now)
            ep.last_used = now  # not idle: it was taken for work
            if not quiet:
                ep.bucket.empty(now)
        return set(taken)

    def wants(self) -> dict[str, int]:
        """How many due deliveries of each endpoint it sends to the poller may claim now
        (`Holds.wants`)."""
        if not self._leases.valid:
            return {}
        return self.holds.wants(self._leases.held, self._endpoints, self.room())

    def claimed(self, wants: dict[str, int], got: Counter[str]) -> None:
        """The poller claimed `got` of the `wants` per endpoint: one that got all it asked for
        may have more waiting in Postgres (`room_for_backlog`)."""
        for key, want in wants.items():
            ep = self._endpoints.get(key)
            if ep is not None and want > 0:
                ep.backlog = got[key] >= want

    def idle(self, idle_for: float) -> list[str]:
        """Held endpoints with nothing queued or in flight, unused for `idle_for` seconds."""
        now = self._clock()
        idle: list[str] = []
        for key in self._leases.held:
            ep = self._endpoints.get(key)
            if ep is None or ep.idle(now, idle_for):
                idle.append(key)
        return idle

    def disown(self, endpoints: Iterable[str]) -> None:
        """These endpoints' leases are gone: their queued jobs go back to Postgres for the new
        holders (attempts under way end as usual)."""
        for key in endpoints:
            ep = self._endpoints.get(key)
            if ep is not None:
                self._hand_back_queue(ep)

    def _hand_back_queue(self, ep: Endpoint) -> None:
        while ep.queue:
            job = ep.queue.popleft()
            self._queued -= 1
            self._shares.left(job.event.account_id)
            self._recorder.hand_back(job, ep.key)

    def _start(self, ep: Endpoint) -> None:
        """Start the endpoint's queued attempts as far as its limits and the global bound allow.

        Whatever stops it arranges for it to be called again: the end of one of the endpoint's
        own attempts (its concurrency), a timer (its rate, a failing endpoint's pause), or a
        place in the line for global slots. No task waits on an endpoint's behalf.
        """
        if ep.timer is not None or ep.in_line:
            return
        try:
            self._start_queued(ep)
        except Exception:
            # A bug. The queued jobs must not be stranded until the endpoint's next job comes:
            # start again in a second (not at once: the same bug would spin).
            log.exception("starting an endpoint's attempts failed", extra={"endpoint": ep.key})
            self._later(ep, 1.0)

    def _start_queued(self, ep: Endpoint) -> None:
        waits = self._metrics.rate_limit_waits_by
        settings = self._settings
        while ep.queue and not self._stopping:
            if ep.active >= ep.cap(
                self._running, settings.max_in_flight, settings.endpoint_concurrency
            ):
                waits("concurrency").inc()
                return
            job = ep.queue[0]
            full = self._running >= settings.max_in_flight
            if full or self._shares.over(job.event.account_id, self._queued + self._running):
                waits("global" if full else "account").inc()
                ep.in_line = True
                self._line.append(ep)
                return
            target = self._cache.get(job.webhook_id)
            if target is None or self._key(target.url) != ep.key:
                ep.queue.popleft()
                self._queued -= 1
                self._shares.left(job.event.account_id)
                if target is None:
                    self._recorder.gone(job)
                else:  # the webhook's URL changed: it belongs to another endpoint now
                    self._enqueue(self._key(target.url), job)
                continue
            if not self._leases.owns(ep.key):
                if self._leases.holds(ep.key):  # until a heartbeat gets through again
                    waits("lease").inc()
                    self._later(ep, _LEASE_RECHECK)
                else:  # another worker took the endpoint over
                    self._hand_back_queue(ep)
                return
            now = self._clock()
            if ep.breaker.tripped:
                pause = ep.breaker.wait(now, behind=self.behind())
                if pause > 0:
                    waits("failing").inc()
                    self._later(ep, pause)
                    return
            wait = ep.bucket.try_take(now)
            if wait > 0:
                waits("rate").inc()
                self._later(ep, wait)
                return
            # The webhook may change before the attempt runs: the runner looks it up again.
            ep.queue.popleft()
            self._queued -= 1
            if ep.backlog and len(ep.queue) <= self.holds.of(ep) // 2:
                self.room_for_backlog.set()
            ep.active += 1
            self._running += 1
            self._shares.started(job.event.account_id)
            ep.last_used = now
            ep.breaker.started(now)
            task = asyncio.create_task(self._runner.run(ep, job))
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)

    def _later(self, ep: Endpoint, delay: float) -> None:
        ep.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, ep)

    def _on_timer(self, ep: Endpoint) -> None:
        ep.timer = None
        self._start(ep)

    def _ended(self, ep: Endpoint, account: str, succeeded: bool | None) -> None:
        """An attempt ended (`AttemptRunner`): its outcome, unless it says nothing about the
        endpoint (None), adapts the endpoint's concurrency (`Endpoint.succeeded`, `failed`)."""
        if succeeded is not None:
            if succeeded:
                ep.succeeded(self._settings.endpoint_concurrency)
            else:
                ep.failed(self._clock())
        self._finished(ep, account)

    def _finished(self, ep: Endpoint, account: str) -> None:
        """An attempt ended: its global slot goes to the first endpoint in line, if any, and
        the endpoint that made it may start its next one (behind the line if slots are short).

        An endpoint in line whose account is over its share goes back in line: each is asked
        once, so a line of such endpoints alone ends the loop.
        """
        ep.active -= 1
        self._running -= 1
        self._shares.ended(account)
        line = self._line
        for _ in range(len(line)):
            if not line or self._running >= self._settings.max_in_flight:
                break
            first = line.popleft()
            first.in_line = False
            self._start(first)
        self._start(ep)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = self._clock()
            idle_for = max(_SWEEP_INTERVAL, 1.0 / self._settings.endpoint_rate)
            for key, ep in list(self._endpoints.items()):
                if ep.idle(now, idle_for):
                    del self._endpoints[key]
            self._lease_taker.sweep(now)

    async def drain(self, grace: float) -> int:
        """Start no more attempts; wait up to `grace` seconds for those under way, cancel the
        rest. Returns how many were cancelled; their deliveries stay pending in Postgres."""
        self._stopping = True
        for ep in self._endpoints.values():
            if ep.timer is not None:
                ep.timer.cancel()
                ep.timer = None
        self._line.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        cancelled = 0
        if self._attempts:
            _, late = await asyncio.wait(set(self._attempts), timeout=grace)
            for task in late:
                task.cancel()
            cancelled = len(late)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)
        return cancelled

"""Dispatching: per-endpoint queues with a rate and a concurrency cap, and a global bound.

Every endpoint (scheme + host + port) has its own in-memory queue, token bucket and
concurrency count, and no task of its own: the end of one of its attempts, a timer (for a token
or a pause) or a global slot handed on in line order starts its next attempts. A job leaves its
queue only when its endpoint has a token and a free slot and a global in-flight slot is free,
so an endpoint that hangs or fails holds at most `endpoint_concurrency` slots — and, while slots
are in demand, soon just one, as each failure halves its concurrency and each success adds one
back — and the rest of its backlog waits in its own queue (acked already, durable in Postgres)
and delays nobody else.

An endpoint whose last attempts all failed is *failing* (`engine.core.breaker`). While the
worker is `behind` (its consumer has a backlog), a failing endpoint starts one attempt per
pause, a pause that grows per failure, until one succeeds: a receiver that answers 500 at once
then costs the busy worker little more than one that hangs, and the time goes to everybody
else. With time to spare, retries keep their schedule, at most `FAILING_RATE` attempt starts a
second, so retries that come due together do not all take the CPU at once. A failing endpoint
holds at most `hold_each` jobs in memory; the ones beyond are parked — put back in Postgres,
due a while later, spread over half as long again so they do not all come back at once — so
dead endpoints cannot fill the memory that healthy ones' deliveries pass through. While it
still holds at least half of that, the poller leaves its due deliveries in Postgres (`wants`):
claimed, they would only be parked again. Every other endpoint holds at most half the worker's
hold (`hold_busy`); the rest wait in Postgres, due, and are claimed per endpoint as it makes
room, and each endpoint may always hold `FLOOR` jobs however full the worker is: a deep backlog
at one endpoint never stands in front of another's deliveries.

The worker sends only to endpoints whose lease it holds (`engine.worker.leases`): one worker per
endpoint at a time, so the rate and concurrency above hold for the whole deployment. A job for
an endpoint held by another worker goes back to Postgres, unclaimed, for that worker's poller.

Just before an attempt the webhook is looked up in the cache: the attempt uses its current URL
and secret, and a deleted or deactivated webhook ends the delivery `failed` with no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg

from engine.core.breaker import Breaker
from engine.core.payload import build_body
from engine.core.ratelimit import TokenBucket
from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.settings import Settings
from engine.store.webhooks import WebhookTarget
from engine.worker.cache import SubscriptionCache
from engine.worker.job import Job
from engine.worker.leases import Leases
from engine.worker.metrics import Metrics
from engine.worker.recorder import Recorder
from engine.worker.retrying import TRANSIENT

__all__ = ["INTERNAL", "Dispatcher", "Placement", "endpoint_key"]

log = logging.getLogger(__name__)

# The error class of an attempt that failed inside the worker rather than at the receiver.
INTERNAL = "internal"

_DEFAULT_PORTS = {"https": 443, "http": 80}
# Idle endpoints are forgotten after this long, once their bucket would be full again anyway.
_SWEEP_INTERVAL = 30.0
# An endpoint whose lease another worker holds is not asked for again for this long: its
# deliveries go to Postgres unclaimed meanwhile, for that worker (or, should it let the lease
# go, for whoever finds them due next).
_OTHERS_FOR = 1.0
# Jobs an endpoint may always hold in memory, however full the worker is: a newcomer's first
# deliveries are never left in Postgres because other endpoints filled the hold.
FLOOR = 16
# Taking leases failed: an outage, or (rarely) a deadlock with a worker releasing some of them.
_LEASE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.DeadlockDetectedError)
# While the leases wait for a heartbeat to get through, a held endpoint looks again this often.
_LEASE_RECHECK = 0.1


def endpoint_key(url: str) -> str:
    """`https://host:port`: deliveries sharing it share the endpoint's limits."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a delivery about to be created goes: claimed by this worker (which sends to its
    endpoint and has room for it), or unclaimed in Postgres, due now or `park_for` seconds
    from now. `endpoint` is None if its webhook went away meanwhile."""

    endpoint: str | None
    claimed: bool
    park_for: float = 0.0


class _Endpoint:
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
        self.limit = limit  # attempts it may have in flight now: see Dispatcher._adapt
        self.bucket = bucket
        self.breaker = breaker
        self.timer: asyncio.TimerHandle | None = None  # set while it waits for a token or pause
        self.in_line = False  # while it waits for a global slot (Dispatcher._line)
        self.last_used = now
        self.parked: set[str] = set()  # webhooks whose jobs it parked since it last succeeded
        self.backlog = False  # due deliveries of it wait in Postgres for room here


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
        self._sender = sender
        self._recorder = recorder
        self._metrics = metrics
        self._clock = clock
        self._endpoints: dict[str, _Endpoint] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._running = 0  # attempts started and not yet ended (the tasks' set lags a little)
        # Endpoints that could start an attempt but for a free global slot, in the order they
        # asked: each freed slot goes to the first of them.
        self._line: deque[_Endpoint] = deque()
        # Per account: attempts in flight, and jobs queued or in flight (`_over_share`).
        self._running_by: Counter[str] = Counter()
        self._load: Counter[str] = Counter()
        self._share = max(1, settings.max_in_flight * 3 // 4)
        self._queued = 0
        self._stopping = False
        self._keys: dict[str, str] = {}  # url → endpoint key, so hot paths skip urlsplit
        self._others: dict[str, float] = {}  # endpoint → until when it is left to its holder
        # Deliveries this worker holds in memory, from submit until their outcome is written.
        self.held: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # Bound on jobs held in memory; beyond it new work stays in Postgres for the poller.
        self.capacity = max(10_000, 20 * settings.max_in_flight)
        # Bounds on the jobs one endpoint holds in memory: a failing one (beyond it they are
        # parked in Postgres, due later) and any other (beyond it they stay in Postgres, due,
        # and are claimed as it makes room).
        self.hold_each = self.capacity // 20
        self.hold_busy = self.capacity // 2
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
        return max(0, self.capacity - self._queued - self._running)

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

    def _endpoint(self, key: str, now: float) -> _Endpoint:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            rate = self._settings.endpoint_rate
            bucket = TokenBucket(rate, max(1.0, rate), now)
            limit = self._settings.endpoint_concurrency
            breaker = Breaker(self._pause_cap)
            endpoint = self._endpoints[key] = _Endpoint(key, bucket, breaker, now, limit)
        return endpoint

    def _enqueue(self, key: str, job: Job) -> None:
        if not self._leases.holds(key):
            # Another worker sends to this endpoint (or nobody, for now): the holder of its
            # lease claims the delivery from Postgres.
            self._recorder.hand_back(job, key)
            return
        now = self._clock()
        endpoint = self._endpoint(key, now)
        if self._full(endpoint):
            self._recorder.park(job, self._park(endpoint, job.webhook_id, now))
            return
        endpoint.queue.append(job)
        endpoint.last_used = now
        self._queued += 1
        self._load[job.event.account_id] += 1
        if len(endpoint.queue) == 1:
            # A queue that had work is waiting already: for a slot of its own, a token or the
            # end of a pause (a timer), or a global slot (the line); each of them starts it.
            self._start(endpoint)

    def _full(self, ep: _Endpoint) -> bool:
        """Whether a failing endpoint holds all it may in memory (the rest is parked)."""
        return ep.breaker.tripped and len(ep.queue) >= self.hold_each

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
        now = self._clock()
        room = self.room()
        taking: Counter[str] = Counter()
        placed: dict[str, Placement] = {}
        for delivery_id, webhook_id in pairs:
            key = keys.get(delivery_id)
            if key is None:  # gone since it was matched: claimed, it ends at once (`submit`)
                placed[delivery_id] = Placement(None, claimed=True)
                continue
            ep = self._endpoints.get(key)
            queued = len(ep.queue) if ep is not None else 0
            if not self._leases.holds(key):
                placed[delivery_id] = Placement(key, claimed=False)
            elif self._has_room(ep, queued + taking[key], room):
                room -= 1
                taking[key] += 1
                placed[delivery_id] = Placement(key, claimed=True)
            elif ep is not None and ep.breaker.tripped:
                park_for = self._park(ep, webhook_id, now)
                placed[delivery_id] = Placement(key, claimed=False, park_for=park_for)
            else:
                placed[delivery_id] = Placement(key, claimed=False)
                if ep is not None:
                    ep.backlog = True
        return placed

    async def lease(self, endpoints: Iterable[str]) -> set[str]:
        """Take the leases of those endpoints nobody holds; return the ones taken.

        A new holder starts with an empty token bucket unless the endpoint was quiet — its
        previous holder released it long enough ago for a full bucket — so the handover never
        sends more than one bucket would.
        """
        if not self._leases.valid:
            return set()
        now = self._clock()
        wanted = {
            key
            for key in endpoints
            if not self._leases.holds(key) and self._others.get(key, 0.0) <= now
        }
        if not wanted:
            return set()
        try:
            taken = await self._leases.acquire(wanted)
        except _LEASE_ERRORS as exc:
            # Their deliveries wait in Postgres, unclaimed, for a later poll.
            log.warning("taking endpoint leases failed", extra={"error": str(exc)})
            return set()
        now = self._clock()
        for key in wanted:
            if key not in taken:
                self._others[key] = now + _OTHERS_FOR
                continue
            self._others.pop(key, None)
            ep = self._endpoint(key, now)
            ep.last_used = now  # not idle: it was taken for work
            if not taken[key]:
                ep.bucket.empty(now)
        return set(taken)

    def wants(self) -> dict[str, int]:
        """How many due deliveries of each endpoint it sends to the poller may claim now.

        Each up to what the endpoint may hold in memory, a fair share of the worker's room at
        least, and none for a failing endpoint that parked deliveries and still holds at least
        half of what it may: claimed, they would only be parked again, poll after poll. Such an
        endpoint's deliveries are claimed as usual once it is down to half (what does not fit
        is parked again: once per half a queue, not once per attempt) or has recovered.
        """
        if not self._leases.valid:
            return {}
        held = self._leases.held
        room = self.room()
        share = max(FLOOR, room // max(1, len(held)))
        wants: dict[str, int] = {}
        for key in held:
            ep = self._endpoints.get(key)
            queued = len(ep.queue) if ep is not None else 0
            if ep is not None and self._holds_back(ep):
                continue
            want = min(self._hold(ep) - queued, share, max(room, FLOOR - queued))
            if want > 0:
                wants[key] = want
                room = max(0, room - want)
        return wants

    def _hold(self, ep: _Endpoint | None) -> int:
        """How many jobs the endpoint may hold in memory."""
        return self.hold_each if ep is not None and ep.breaker.tripped else self.hold_busy

    def _has_room(self, ep: _Endpoint | None, queued: int, room: int) -> bool:
        """Whether the endpoint may take one more job: within its own bound, and within the
        worker's (`room`) unless it holds fewer than FLOOR."""
        return queued < self._hold(ep) and (room > 0 or queued < FLOOR)

    def _holds_back(self, ep: _Endpoint) -> bool:
        return bool(ep.parked) and ep.breaker.tripped and len(ep.queue) >= self.hold_each // 2

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
            if ep is None or (not ep.queue and not ep.active and now - ep.last_used > idle_for):
                idle.append(key)
        return idle

    def disown(self, endpoints: Iterable[str]) -> None:
        """These endpoints' leases are gone: their queued jobs go back to Postgres for the new
        holders (attempts under way end as usual)."""
        for key in endpoints:
            ep = self._endpoints.get(key)
            if ep is not None:
                self._hand_back_queue(ep)

    def _hand_back_queue(self, ep: _Endpoint) -> None:
        while ep.queue:
            job = ep.queue.popleft()
            self._queued -= 1
            self._unload(job.event.account_id)
            self._recorder.hand_back(job, ep.key)

    def _unload(self, account: str) -> None:
        """One of the account's jobs left this worker (ended, or went back to Postgres)."""
        self._load[account] -= 1
        if not self._load[account]:
            del self._load[account]

    def _over_share(self, account: str) -> bool:
        """Whether the account holds its share of the global slots (three quarters of them)
        while another account has work here: the rest is then kept for that work. Alone, an
        account may use every slot."""
        return self._running_by[account] >= self._share and self._load[account] < (
            self._queued + self._running
        )

    def _park(self, ep: _Endpoint, webhook_id: str, now: float) -> float:
        """Seconds a job of this full failing endpoint waits in Postgres; its webhook is noted
        as parked (`wants`)."""
        ep.parked.add(webhook_id)
        return ep.breaker.park_for(now, spread=random.random())

    def _start(self, ep: _Endpoint) -> None:
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

    def _start_queued(self, ep: _Endpoint) -> None:
        waits = self._metrics.rate_limit_waits_by
        while ep.queue and not self._stopping:
            if ep.active >= self._cap(ep):
                waits("concurrency").inc()
                return
            job = ep.queue[0]
            full = self._running >= self._settings.max_in_flight
            if full or self._over_share(job.event.account_id):
                waits("global" if full else "account").inc()
                ep.in_line = True
                self._line.append(ep)
                return
            target = self._cache.get(job.webhook_id)
            if target is None or self._key(target.url) != ep.key:
                ep.queue.popleft()
                self._queued -= 1
                self._unload(job.event.account_id)
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
            # The webhook may change before the attempt runs: `_attempt` looks it up again.
            ep.queue.popleft()
            self._queued -= 1
            if ep.backlog and len(ep.queue) <= self._hold(ep) // 2:
                self.room_for_backlog.set()
            ep.active += 1
            self._running += 1
            self._running_by[job.event.account_id] += 1
            ep.last_used = now
            ep.breaker.started(now)
            task = asyncio.create_task(self._attempt(ep, job))
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)

    def _later(self, ep: _Endpoint, delay: float) -> None:
        ep.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, ep)

    def _on_timer(self, ep: _Endpoint) -> None:
        ep.timer = None
        self._start(ep)

    def _finished(self, ep: _Endpoint, account: str) -> None:
        """An attempt ended: its global slot goes to the first endpoint in line, if any, and
        the endpoint that made it may start its next one (behind the line if slots are short).

        An endpoint in line whose account is over its share goes back in line: each is asked
        once, so a line of such endpoints alone ends the loop.
        """
        ep.active -= 1
        self._running -= 1
        self._running_by[account] -= 1
        if not self._running_by[account]:
            del self._running_by[account]
        self._unload(account)
        line = self._line
        for _ in range(len(line)):
            if not line or self._running >= self._settings.max_in_flight:
                break
            first = line.popleft()
            first.in_line = False
            self._start(first)
        self._start(ep)

    async def _attempt(self, ep: _Endpoint, job: Job) -> None:
        try:
            target = self._cache.get(job.webhook_id)
            if target is None:
                self._recorder.gone(job)
                return
            if job.received_at is not None and job.attempt == 1:
                self._metrics.event_lag.observe(asyncio.get_running_loop().time() - job.received_at)
            attempted_at = datetime.now(UTC)
            try:
                secrets = target.signing_secrets(attempted_at)
            except ValueError as exc:
                # Sealed with a key this worker lacks. Nothing is sent; the attempt fails and is
                # retried on schedule, so a fixed key delivers it.
                log.error(  # noqa: TRY400 - the reason says it all; a traceback adds nothing
                    "cannot open the webhook's signing secret",
                    extra={**_ids(job), "error": str(exc)},
                )
                outcome = Outcome(False, None, 0, INTERNAL, f"cannot open signing secret: {exc}")
            else:
                try:
                    outcome = await self._sender.send(target.url, *_request(job, target, *secrets))
                except Exception as exc:
                    # A bug of ours, not the receiver's fault. Recorded as a failed attempt, so
                    # the delivery follows its retry schedule instead of staying held here.
                    log.exception("delivery attempt raised", extra=_ids(job))
                    error = f"internal error: {type(exc).__name__}"
                    outcome = Outcome(False, None, 0, INTERNAL, error)
            self._recorder.attempted(job, outcome, attempted_at)
            if outcome.error_class != INTERNAL:  # our failure says nothing about the endpoint
                self._adapt(ep, outcome.succeeded)
        finally:
            self._finished(ep, job.event.account_id)

    def _cap(self, ep: _Endpoint) -> int:
        """How many attempts the endpoint may have in flight now.

        Its own `limit` while global slots are in demand (half of them taken or more); while
        they are not, a failing endpoint may use its configured concurrency: slots nobody else
        wants cost no one anything.
        """
        if self._running * 2 < self._settings.max_in_flight:
            return self._settings.endpoint_concurrency
        return ep.limit

    def _adapt(self, ep: _Endpoint, succeeded: bool) -> None:
        """Additive increase, multiplicative decrease of the endpoint's concurrency.

        An endpoint that fails or hangs soon has a single attempt in flight while slots are in
        demand (`_cap`), so it holds one global slot rather than `endpoint_concurrency` of them
        and its backlog waits in its own queue; each success gives a slot back, up to the
        configured concurrency. The breaker counts the streak of failures that pauses it.
        """
        if succeeded:
            ep.breaker.succeeded()
            ep.parked.clear()
            if ep.limit < self._settings.endpoint_concurrency:
                ep.limit += 1
        else:
            ep.breaker.failed(self._clock())
            if ep.limit > 1:
                ep.limit //= 2

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = self._clock()
            idle_for = max(_SWEEP_INTERVAL, 1.0 / self._settings.endpoint_rate)
            for key, ep in list(self._endpoints.items()):
                if not ep.queue and not ep.active and now - ep.last_used > idle_for:
                    del self._endpoints[key]
            self._others = {k: t for k, t in self._others.items() if t > now}

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


def _ids(job: Job) -> dict[str, str]:
    return {"delivery_id": job.delivery_id, "webhook_id": job.webhook_id}


def _request(
    job: Job, target: WebhookTarget, secret: str, next_secret: str | None
) -> tuple[bytes, dict[str, str]]:
    event = job.event
    body = build_body(
        event_type=event.type,
        timestamp=event.timestamp,
        webhook_id=target.id,
        delivery_id=job.delivery_id,
        data=event.data,
    )
    headers = request_headers(
        secret=secret,
        body=body,
        event_type=event.type,
        delivery_id=job.delivery_id,
        next_secret=next_secret,
    )
    return body, headers

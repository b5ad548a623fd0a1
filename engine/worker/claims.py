"""Claims: which endpoints this worker sends to, and which deliveries it takes into memory.

The worker sends only to endpoints whose lease it holds (`engine.worker.leases`): one worker per
endpoint at a time, so the rate and concurrency of `engine.worker.admission` hold for the whole
deployment. A delivery for an endpoint held by another worker goes to Postgres unclaimed, for
that worker's poller; one for an endpoint nobody holds makes this worker take its lease.

A delivery about to be created is claimed by this worker while its endpoint and the worker have
room in memory (`placements`). Otherwise it is created unclaimed, due now, for the poller to
claim as the endpoint makes room — or, for a failing endpoint that holds all it may, parked:
due a while later, spread over half as long again so they do not all come back at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import asyncpg

from engine.worker.admission import Endpoint, Holds
from engine.worker.leases import Leases
from engine.worker.retrying import TRANSIENT

__all__ = ["LeaseTaker", "Placement", "park", "placements"]

log = logging.getLogger(__name__)

# An endpoint whose lease another worker holds is not asked for again for this long: its
# deliveries go to Postgres unclaimed meanwhile, for that worker (or, should it let the lease
# go, for whoever finds them due next).
_OTHERS_FOR = 1.0
# Taking leases failed: an outage, or (rarely) a deadlock with a worker releasing some of them.
_LEASE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.DeadlockDetectedError)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a delivery about to be created goes: claimed by this worker (which sends to its
    endpoint and has room for it), or unclaimed in Postgres, due now or `park_for` seconds
    from now. `endpoint` is None if its webhook went away meanwhile."""

    endpoint: str | None
    claimed: bool
    park_for: float = 0.0


class LeaseTaker:
    """Takes the leases of endpoints nobody holds, leaving those another worker holds alone
    for `_OTHERS_FOR` seconds."""

    def __init__(self, leases: Leases, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._leases = leases
        self._clock = clock
        self._others: dict[str, float] = {}  # endpoint → until when it is left to its holder

    async def take(self, endpoints: Iterable[str]) -> dict[str, bool]:
        """The leases taken of these endpoints, each with whether the endpoint was quiet
        (`Leases.acquire`); none while this worker's leases are not valid."""
        if not self._leases.valid:
            return {}
        now = self._clock()
        wanted = {
            key
            for key in endpoints
            if not self._leases.holds(key) and self._others.get(key, 0.0) <= now
        }
        if not wanted:
            return {}
        try:
            taken = await self._leases.acquire(wanted)
        except _LEASE_ERRORS as exc:
            # Their deliveries wait in Postgres, unclaimed, for a later poll.
            log.warning("taking endpoint leases failed", extra={"error": str(exc)})
            return {}
        now = self._clock()
        for key in wanted:
            if key in taken:
                self._others.pop(key, None)
            else:
                self._others[key] = now + _OTHERS_FOR
        return taken

    def sweep(self, now: float) -> None:
        """Forget the endpoints left to their holders until before `now`."""
        self._others = {k: t for k, t in self._others.items() if t > now}


def placements(
    deliveries: Iterable[tuple[str, str]],
    keys: Mapping[str, str],
    *,
    endpoints: Mapping[str, Endpoint],
    holds: Holds,
    room: int,
    leased: Callable[[str], bool],
    now: float,
) -> dict[str, Placement]:
    """Where each of these (delivery id, webhook id) pairs goes (`Placement`).

    `keys` maps a delivery id to its endpoint (missing: its webhook is gone), `leased` says
    whether this worker holds an endpoint's lease, `room` how many more jobs the worker may
    hold in memory. Notes on the endpoints which of them parked deliveries and which have a
    backlog waiting in Postgres.
    """
    taking: Counter[str] = Counter()
    placed: dict[str, Placement] = {}
    for delivery_id, webhook_id in deliveries:
        key = keys.get(delivery_id)
        if key is None:  # gone since it was matched: claimed, it ends at once (`submit`)
            placed[delivery_id] = Placement(None, claimed=True)
            continue
        ep = endpoints.get(key)
        queued = len(ep.queue) if ep is not None else 0
        if not leased(key):
            placed[delivery_id] = Placement(key, claimed=False)
        elif holds.has_room(ep, queued + taking[key], room):
            room -= 1
            taking[key] += 1
            placed[delivery_id] = Placement(key, claimed=True)
        elif ep is not None and ep.breaker.tripped:
            park_for = park(ep, webhook_id, now)
            placed[delivery_id] = Placement(key, claimed=False, park_for=park_for)
        else:
            placed[delivery_id] = Placement(key, claimed=False)
            if ep is not None:
                ep.backlog = True
    return placed


def park(ep: Endpoint, webhook_id: str, now: float) -> float:
    """Seconds a job of this full failing endpoint waits in Postgres; its webhook is noted
    as parked (`Holds.holds_back`)."""
    ep.parked.add(webhook_id)
    return ep.breaker.park_for(now, spread=random.random())

"""This worker's endpoint leases: which endpoints it sends to, and until when it may believe so.

A lease counts while the worker's heartbeat is fresh in Postgres, and other workers take it
over once the heartbeat is `worker_lease` old. So the worker trusts its leases only until a
margin before that, counted from when its last successful beat was *sent*: should its beats
stop getting through (a database outage, a network partition), it stops sending before anyone
else may start. Each beat also compares the leases with what Postgres says, and drops those
another worker took over meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from engine.settings import Settings
from engine.store.endpoints import acquire_leases, leases_held, release_leases

__all__ = ["Leases"]

# The worker stops trusting its leases this share of a lease before others may take them over.
MARGIN = 0.25


class Leases:
    """The endpoints this worker holds. `acquire`, `owns`, `renewed`, `verify`, `release`."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool[Any],
        worker_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._worker_id = worker_id
        self._clock = clock
        self._held: set[str] = set()
        self._acquiring: set[str] = set()  # asked for right now (`verify` leaves them alone)
        self._valid_until = float("-inf")

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def valid(self) -> bool:
        """Whether the last beat is recent enough for the leases to count."""
        return self._clock() < self._valid_until

    def owns(self, endpoint: str) -> bool:
        """Whether this worker may send to `endpoint` now."""
        return endpoint in self._held and self.valid

    def holds(self, endpoint: str) -> bool:
        """Whether the endpoint's lease is this worker's (valid now or not)."""
        return endpoint in self._held

    def renewed(self, beat_sent_at: float) -> None:
        """A heartbeat sent at `beat_sent_at` (this clock) went through."""
        lease = self._settings.worker_lease
        self._valid_until = max(self._valid_until, beat_sent_at + lease * (1 - MARGIN))

    async def acquire(self, endpoints: Iterable[str]) -> dict[str, bool]:
        """Take the leases of those endpoints no live worker holds; return the ones newly
        taken, each with whether it was quiet (see `engine.store.endpoints.acquire_leases`)."""
        wanted = [e for e in set(endpoints) if e not in self._held]
        if not wanted or not self.valid:
            return {}
        self._acquiring.update(wanted)
        try:
            taken = await acquire_leases(
                self._pool, self._worker_id, wanted, lease=self._settings.worker_lease
            )
        finally:
            self._acquiring.difference_update(wanted)
        self._held.update(taken)
        return taken

    async def verify(self) -> set[str]:
        """Drop and return the leases Postgres no longer says are this worker's; give up those
        it says are, that this worker has forgotten (their release failed), lest nobody
        serve those endpoints while this worker lives."""
        before = set(self._held)  # (those taken while this reads are Postgres's already)
        held = await leases_held(self._pool, self._worker_id)
        lost = before - held
        self._held -= lost
        stray = held - before - self._held - self._acquiring
        if stray:
            await release_leases(self._pool, self._worker_id, list(stray))
        return lost

    def forget(self, endpoints: Iterable[str]) -> None:
        """Stop sending to these endpoints now (`release` tells Postgres)."""
        self._held.difference_update(endpoints)

    async def release(self, endpoints: Iterable[str]) -> None:
        """Give these endpoints' leases up in Postgres (after `forget`)."""
        endpoints = list(endpoints)
        if endpoints:
            await release_leases(self._pool, self._worker_id, endpoints)

"""Admission arithmetic (`now` passed in): an endpoint's cap and its adaptation, what endpoints
may hold in memory, account shares, and where a new delivery goes."""

from __future__ import annotations

import pytest

from engine.core.breaker import TRIP, Breaker
from engine.core.events import Event
from engine.core.ratelimit import TokenBucket
from engine.worker.admission import FLOOR, Endpoint, Holds, Shares, endpoint_key
from engine.worker.claims import Placement, placements
from engine.worker.job import Job

CONCURRENCY = 8
MAX_IN_FLIGHT = 1000  # capacity 20,000: each 1,000, busy 10,000


def _endpoint(*, queued: int = 0, failing: bool = False, limit: int = CONCURRENCY) -> Endpoint:
    ep = Endpoint("https://a.example:443", TokenBucket(1.0, 1.0, 0.0), Breaker(1.0), 0.0, limit)
    event = Event("evt_1", "document.uploaded", "acct_1", "live", "2026-03-02T11:45:00Z", b"{}")
    ep.queue.extend(Job(f"dlv_{n}", "wh_1", event, 1) for n in range(queued))
    if failing:
        for _ in range(TRIP):
            ep.breaker.failed(0.0)
    return ep


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://A.example/hook", "https://a.example:443"),
        ("https://a.example:8443/x?y", "https://a.example:8443"),
        ("http://a.example/", "http://a.example:80"),
        ("https://[::1]/", "https://::1:443"),
    ],
)
def test_endpoint_key(url: str, key: str) -> None:
    assert endpoint_key(url) == key


@pytest.mark.parametrize(
    ("running", "limit", "cap"),
    [
        (0, 1, CONCURRENCY),  # slots nobody wants: the configured concurrency
        (MAX_IN_FLIGHT // 2 - 1, 1, CONCURRENCY),
        (MAX_IN_FLIGHT // 2, 1, 1),  # slots in demand: its own limit
        (MAX_IN_FLIGHT, 3, 3),
    ],
)
def test_cap(running: int, limit: int, cap: int) -> None:
    assert _endpoint(limit=limit).cap(running, MAX_IN_FLIGHT, CONCURRENCY) == cap


def test_failures_halve_the_limit_and_successes_add_one_back() -> None:
    ep = _endpoint()
    limits = []
    for succeeded in [False, False, False, False, True, True, False]:
        if succeeded:
            ep.succeeded(CONCURRENCY)
        else:
            ep.failed(0.0)
        limits.append(ep.limit)
    assert limits == [4, 2, 1, 1, 2, 3, 1]
    for _ in range(20):
        ep.succeeded(CONCURRENCY)
    assert ep.limit == CONCURRENCY


def test_a_success_forgets_the_parked_webhooks() -> None:
    ep = _endpoint()
    ep.parked.add("wh_1")
    ep.succeeded(CONCURRENCY)
    assert not ep.parked


@pytest.mark.parametrize(
    ("failing", "queued", "room", "has_room"),
    [
        (False, 0, 1, True),
        (False, 0, 0, True),  # below FLOOR, whatever the worker's room
        (False, FLOOR - 1, 0, True),
        (False, FLOOR, 0, False),
        (False, 10_000 - 1, 5, True),
        (False, 10_000, 5, False),  # its own bound: half the capacity
        (True, 1_000 - 1, 5, True),
        (True, 1_000, 5, False),  # a failing endpoint's bound
    ],
)
def test_has_room(failing: bool, queued: int, room: int, has_room: bool) -> None:
    holds = Holds(MAX_IN_FLIGHT)
    assert holds.has_room(_endpoint(failing=failing), queued, room) is has_room


@pytest.mark.parametrize(
    ("failing", "queued", "parked", "full", "holds_back"),
    [
        (False, 1_000, True, False, False),
        (True, 999, False, False, False),
        (True, 1_000, False, True, False),
        (True, 499, True, False, False),
        (True, 500, True, False, True),  # parked and still half full: claims wait
    ],
)
def test_full_and_holds_back(
    failing: bool, queued: int, parked: bool, full: bool, holds_back: bool
) -> None:
    holds = Holds(MAX_IN_FLIGHT)
    ep = _endpoint(queued=queued, failing=failing)
    if parked:
        ep.parked.add("wh_1")
    assert holds.full(ep) is full
    assert holds.holds_back(ep) is holds_back


def test_wants_shares_the_room_and_always_allows_the_floor() -> None:
    holds = Holds(MAX_IN_FLIGHT)
    busy = _endpoint(queued=5)
    endpoints = {"a": busy}
    assert holds.wants(["a", "b"], endpoints, room=100) == {"a": 50, "b": 50}
    assert holds.wants(["a", "b"], endpoints, room=0) == {"a": FLOOR - 5, "b": FLOOR}
    assert holds.wants([], endpoints, room=100) == {}


def test_wants_nothing_of_an_endpoint_that_holds_back() -> None:
    holds = Holds(MAX_IN_FLIGHT)
    ep = _endpoint(queued=500, failing=True)
    ep.parked.add("wh_1")
    assert holds.wants(["a"], {"a": ep}, room=5_000) == {}


@pytest.mark.parametrize(
    ("running", "load", "held", "over"),
    [
        (749, 749, 800, False),
        (750, 750, 800, True),  # three quarters, and another account has work
        (750, 800, 800, False),  # alone: every slot
    ],
)
def test_share(running: int, load: int, held: int, over: bool) -> None:
    shares = Shares(MAX_IN_FLIGHT)
    for _ in range(load):
        shares.queued("acct_1")
    for _ in range(running):
        shares.started("acct_1")
    assert shares.over("acct_1", held) is over


def test_an_ended_attempt_leaves_the_share() -> None:
    shares = Shares(MAX_IN_FLIGHT)
    for _ in range(750):
        shares.queued("acct_1")
        shares.started("acct_1")
    assert shares.over("acct_1", 751)
    shares.ended("acct_1")
    assert not shares.over("acct_1", 750)


def test_placements() -> None:
    holds = Holds(MAX_IN_FLIGHT)
    full = _endpoint(queued=1_000, failing=True)
    behind = _endpoint(queued=10_000)
    # d_gone has no endpoint: its webhook went away.
    keys = {"d_other": "other", "d_ok": "ok", "d_full": "full", "d_behind": "behind"}
    placed = placements(
        [(d, "wh_1") for d in ["d_gone", "d_other", "d_ok", "d_full", "d_behind"]],
        keys,
        endpoints={"full": full, "behind": behind},
        holds=holds,
        room=10,
        leased=lambda key: key != "other",
        now=100.0,
    )
    assert placed["d_gone"] == Placement(None, claimed=True)
    assert placed["d_other"] == Placement("other", claimed=False)
    assert placed["d_ok"] == Placement("ok", claimed=True)
    assert placed["d_full"].claimed is False
    assert placed["d_full"].park_for > 0
    assert full.parked == {"wh_1"}
    assert placed["d_behind"] == Placement("behind", claimed=False)
    assert behind.backlog

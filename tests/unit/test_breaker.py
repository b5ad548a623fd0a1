"""The failure-streak arithmetic that paces a failing endpoint (`now` passed in)."""

from __future__ import annotations

import pytest

from engine.core.breaker import (
    FAILING_BURST,
    FAILING_RATE,
    FIRST_PAUSE,
    MAX_PARK,
    MIN_PARK,
    TRIP,
    Breaker,
)


def _failed(breaker: Breaker, times: int, now: float = 100.0) -> Breaker:
    for _ in range(times):
        breaker.failed(now)
    return breaker


@pytest.mark.parametrize(
    ("failures", "cap", "wait"),
    [
        (0, 1.0, 0.0),
        (TRIP - 1, 1.0, 0.0),  # not paused yet: failures below the trip cost no wait
        (TRIP, 1.0, FIRST_PAUSE),
        (TRIP + 1, 1.0, 2 * FIRST_PAUSE),
        (TRIP + 3, 1.0, 8 * FIRST_PAUSE),
        (TRIP + 5, 1.0, 1.0),  # doubled past the cap
        (TRIP + 5, 0.2, 0.2),  # a short retry schedule keeps the pause short
        (TRIP + 10_000, 1.0, 1.0),  # a streak of hours does not overflow
    ],
)
def test_pause_after_a_streak(failures: int, cap: float, wait: float) -> None:
    breaker = _failed(Breaker(cap), failures)
    assert breaker.tripped is (failures >= TRIP)
    assert breaker.pause == pytest.approx(wait)
    assert breaker.wait(100.0, behind=True) == 0.0  # nothing started yet
    breaker.started(100.0)
    assert breaker.wait(100.0, behind=True) == pytest.approx(wait)


def test_the_pause_counts_from_the_last_start_and_passes() -> None:
    breaker = _failed(Breaker(1.0), TRIP)
    breaker.started(100.0)
    assert breaker.wait(100.0 + FIRST_PAUSE / 2, behind=True) == pytest.approx(FIRST_PAUSE / 2)
    assert breaker.wait(100.0 + FIRST_PAUSE, behind=True) == 0.0
    breaker.failed(200.0)
    breaker.started(200.0)
    assert breaker.wait(200.0, behind=True) == pytest.approx(2 * FIRST_PAUSE)


def test_one_success_ends_the_streak() -> None:
    breaker = _failed(Breaker(1.0), TRIP + 4)
    breaker.started(100.0)
    breaker.succeeded()
    assert not breaker.tripped
    assert breaker.wait(100.0, behind=True) == 0.0
    # and the next streak starts from nothing
    _failed(breaker, TRIP - 1)
    breaker.started(100.0)
    assert breaker.wait(100.0, behind=True) == 0.0


def _starts(breaker: Breaker, now: float, count: int) -> list[float]:
    """Start `count` attempts as soon as the breaker lets them (worker not behind); when."""
    times = []
    for _ in range(count):
        now += breaker.wait(now, behind=False)
        breaker.started(now)
        times.append(now)
    return times


def test_with_time_to_spare_a_failing_endpoint_keeps_to_its_rate_after_a_burst() -> None:
    breaker = _failed(Breaker(1.0), TRIP)
    burst = int(FAILING_BURST)
    times = _starts(breaker, 100.0, burst + 50)
    assert times[burst - 1] == 100.0  # a burst of FAILING_BURST at once
    assert times[burst] > 100.0
    gaps = [b - a for a, b in zip(times[burst:], times[burst + 1 :], strict=False)]
    assert gaps == pytest.approx([1.0 / FAILING_RATE] * len(gaps))
    # Idle for a second, the burst is back.
    assert _starts(breaker, times[-1] + 1.0, burst) == [times[-1] + 1.0] * burst


def test_before_the_trip_and_after_a_success_there_is_no_rate() -> None:
    breaker = _failed(Breaker(1.0), TRIP - 1)
    assert _starts(breaker, 100.0, 500) == [100.0] * 500
    _failed(breaker, 1)
    assert breaker.tripped
    assert _starts(breaker, 100.0, int(FAILING_RATE) + 1)[-1] > 100.0
    breaker.succeeded()
    assert _starts(breaker, 100.0, 500) == [100.0] * 500
    # A new streak starts with a full burst, whatever the last one spent.
    _failed(breaker, TRIP, now=100.0)
    assert _starts(breaker, 100.0, int(FAILING_BURST))[-1] == 100.0


@pytest.mark.parametrize(
    ("failing_for", "park"),
    [
        (0.0, MIN_PARK),  # a fresh streak, however many failures: parked for the floor
        (20.0, 20.0),  # as long as it has been failing
        (86_400.0, MAX_PARK),  # a long-dead endpoint: bounded
    ],
)
def test_park_for(failing_for: float, park: float) -> None:
    breaker = _failed(Breaker(1.0), TRIP, now=100.0)
    _failed(breaker, 1000, now=100.0 + failing_for)  # a burst of failures counts no longer
    assert breaker.park_for(100.0 + failing_for) == pytest.approx(park)


@pytest.mark.parametrize(
    ("failing_for", "spread", "park"),
    [
        (0.0, 0.5, MIN_PARK * 1.25),
        (20.0, 1.0, 30.0),  # at most half as long again
        (86_400.0, 1.0, MAX_PARK),  # and never past the bound
    ],
)
def test_parked_deliveries_are_spread(failing_for: float, spread: float, park: float) -> None:
    breaker = _failed(Breaker(1.0), TRIP, now=100.0)
    assert breaker.park_for(100.0 + failing_for, spread=spread) == pytest.approx(park)


def test_a_new_streak_counts_from_its_own_start() -> None:
    breaker = _failed(Breaker(1.0), TRIP, now=100.0)
    breaker.succeeded()
    _failed(breaker, TRIP, now=500.0)
    assert breaker.park_for(510.0) == pytest.approx(10.0)


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cap"):
        Breaker(0.0)

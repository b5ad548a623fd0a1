"""Backoff arithmetic (docs/contract.md §4) and token buckets: properties over generated inputs."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from random import Random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.core.backoff import (
    DEFAULT_SCHEDULE,
    JITTER,
    RETRY_AFTER_CAP,
    max_attempts,
    next_delay,
    parse_duration,
    parse_retry_after,
    parse_schedule,
)
from engine.core.ratelimit import TokenBucket

PROPERTY = settings(max_examples=200, deadline=None)

delays = st.floats(min_value=0.0, max_value=10 * 86400, allow_nan=False)
schedules = st.lists(delays, min_size=1, max_size=10).map(tuple)
retry_afters = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e7, allow_nan=False))
nows = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))


@PROPERTY
@given(schedules, st.data(), retry_afters, st.integers(0, 2**32))
def test_next_delay_never_undercuts_the_schedule_and_jitter_is_bounded(
    schedule: tuple[float, ...], data: st.DataObject, retry_after: float | None, seed: int
) -> None:
    attempts = data.draw(st.integers(1, len(schedule)))
    scheduled = schedule[attempts - 1]
    delay = next_delay(attempts, schedule, retry_after=retry_after, rng=Random(seed))
    assert delay is not None
    assert delay >= scheduled
    ceiling = scheduled * (1 + JITTER)
    if retry_after is None:
        assert delay <= ceiling + 1e-9
    else:
        honoured = min(retry_after, RETRY_AFTER_CAP)
        assert delay >= honoured  # Retry-After is honoured ...
        assert delay <= max(ceiling, honoured) + 1e-9  # ... but never beyond one hour


@PROPERTY
@given(schedules, st.integers(-5, 20), retry_afters)
def test_no_delay_outside_the_attempts_the_schedule_allows(
    schedule: tuple[float, ...], attempts: int, retry_after: float | None
) -> None:
    delay = next_delay(attempts, schedule, retry_after=retry_after)
    if 1 <= attempts < max_attempts(schedule):
        assert delay is not None
    else:
        assert delay is None


def test_default_schedule_gives_eight_attempts_then_stops() -> None:
    assert max_attempts(DEFAULT_SCHEDULE) == 8
    rng = Random(7)
    waits = [next_delay(n, DEFAULT_SCHEDULE, rng=rng) for n in range(1, 9)]
    assert waits[-1] is None
    for wait, scheduled in zip(waits[:-1], DEFAULT_SCHEDULE, strict=True):
        assert wait is not None
        assert scheduled <= wait <= scheduled * (1 + JITTER)


@PROPERTY
@given(st.integers(0, 10**12))
def test_retry_after_seconds_are_capped_at_an_hour(seconds: int) -> None:
    now = datetime(2026, 3, 2, 11, 45, tzinfo=UTC)
    assert parse_retry_after(str(seconds), now) == min(seconds, RETRY_AFTER_CAP)
    assert parse_retry_after(f"  {seconds} ", now) == min(seconds, RETRY_AFTER_CAP)


@PROPERTY
@given(nows, st.integers(-10 * 86400, 10 * 86400))
def test_retry_after_http_dates_count_from_now(now: datetime, offset: int) -> None:
    header = format_datetime(now + timedelta(seconds=offset), usegmt=True)
    assert parse_retry_after(header, now) == min(max(offset, 0), RETRY_AFTER_CAP)


@PROPERTY
@given(st.one_of(st.none(), st.text(max_size=60)), nows)
@example("²", datetime(2026, 1, 1, tzinfo=UTC))  # str.isdigit() is true for superscripts
@example("٣", datetime(2026, 1, 1, tzinfo=UTC))  # Arabic-Indic digit three
@example("9" * 400, datetime(2026, 1, 1, tzinfo=UTC))
@example("Mon, 01 Jan 99999 00:00:00 GMT", datetime(2026, 1, 1, tzinfo=UTC))
@example("-5", datetime(2026, 1, 1, tzinfo=UTC))
def test_any_retry_after_header_is_a_bounded_delay_or_ignored(
    header: str | None, now: datetime
) -> None:
    delay = parse_retry_after(header, now)
    assert delay is None or 0.0 <= delay <= RETRY_AFTER_CAP


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("86400", RETRY_AFTER_CAP),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # RFC 850, still valid per RFC 9110
        ("Wed Oct 21 07:28:30 2015", 30.0),  # asctime
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_table(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
    assert parse_retry_after(header, now) == seconds


UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(UNITS))), min_size=1))
def test_parse_schedule_reads_what_it_is_given(parts: list[tuple[int, str]]) -> None:
    text = ", ".join(f"{n}{unit}" for n, unit in parts)
    assert parse_schedule(text) == tuple(pytest.approx(n * UNITS[u]) for n, u in parts)


@PROPERTY
@given(st.text(max_size=40))
@example("9" * 400)
@example("1e3")
@example("-1s")
@example(",,")
def test_parse_schedule_takes_finite_durations_or_says_why(text: str) -> None:
    try:
        schedule = parse_schedule(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert schedule
        assert all(math.isfinite(s) and s >= 0 for s in schedule)


def test_parse_duration_table() -> None:
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("5m") == 300
    assert parse_duration("2h") == 7200
    assert parse_duration(" 1.5 s ") == 1.5
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 minutes")


# ---------------------------------------------------------------- token buckets


@PROPERTY
@given(
    st.floats(0.5, 1000.0),
    st.integers(1, 50),
    st.lists(st.floats(0.0, 0.5, allow_nan=False), min_size=1, max_size=300),
)
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_t(
    rate: float, burst: int, gaps: list[float]
) -> None:
    now = 1000.0
    bucket = TokenBucket(rate, burst, now)
    granted: list[float] = []
    for gap in gaps:
        now += gap
        if bucket.try_take(now) == 0.0:
            granted.append(now)
    # In every window [granted[i], granted[j]], at most burst + rate * width tokens.
    for i in range(len(granted)):
        for j in range(i, len(granted)):
            width = granted[j] - granted[i]
            assert j - i + 1 <= burst + rate * width + 1e-6


@PROPERTY
@given(st.floats(0.5, 1000.0), st.integers(1, 50), st.integers(1, 200))
def test_a_refused_take_says_how_long_to_wait_and_that_wait_is_enough(
    rate: float, burst: int, takes: int
) -> None:
    now = 50.0
    bucket = TokenBucket(rate, burst, now)
    for _ in range(takes):
        wait = bucket.try_take(now)
        assert 0.0 <= wait <= 1.0 / rate + 1e-9
        if wait:
            now += wait
            # Float rounding may leave a sliver; it must not be more than a nanosecond.
            assert bucket.try_take(now) <= 1e-9 or bucket.try_take(now + 1e-9) == 0.0


def test_a_bucket_ignores_a_clock_that_goes_backwards() -> None:
    bucket = TokenBucket(1.0, 1, now=100.0)
    assert bucket.try_take(100.0) == 0.0
    assert bucket.try_take(10.0) > 0.0  # no tokens conjured from the past
    assert bucket.try_take(100.5) == pytest.approx(0.5)

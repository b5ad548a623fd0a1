"""Pure parts of docs/contract.md §6 on the worker's side: a resend's fresh retry schedule, the
failing streak a batch of attempts tells, and CARGOLINT_DISABLE_AFTER."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from random import Random

import pytest

from engine.core.backoff import DEFAULT_SCHEDULE, next_delay
from engine.settings import Settings, SettingsError
from engine.store.disabling import Seen, Streak, streaks

SCHEDULE = (1.0, 2.0, 4.0)


@pytest.mark.parametrize(
    ("attempts_made", "retry_base", "scheduled"),
    [
        (1, 0, 1.0),
        (3, 0, 4.0),
        (4, 0, None),  # the schedule's last attempt was the fourth
        (4, 3, 1.0),  # resent after 3 attempts: the fourth is the fresh schedule's first
        (6, 3, 4.0),
        (7, 3, None),
        (3, 3, None),  # nothing made since the resend: no wait to give
        (12, 11, 1.0),  # resent again and again, attempts keep counting
    ],
)
def test_the_step_counts_from_the_resend(
    attempts_made: int, retry_base: int, scheduled: float | None
) -> None:
    delay = next_delay(attempts_made, SCHEDULE, retry_base=retry_base, rng=Random(3))
    if scheduled is None:
        assert delay is None
    else:
        assert delay is not None
        assert scheduled <= delay <= scheduled * 1.1


def test_a_resent_delivery_has_eight_attempts_again() -> None:
    made = 8  # the default schedule's attempts, all failed, then a resend
    waits = [next_delay(made + n, DEFAULT_SCHEDULE, retry_base=made) for n in range(1, 9)]
    assert all(w is not None for w in waits[:7])
    assert waits[7] is None


T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([(0, True), (1, True)], (at(1), None, None)),
        ([(0, False), (1, False)], (None, at(0), at(1))),
        ([(0, False), (1, True)], (at(1), None, None)),
        ([(0, True), (1, False), (2, False)], (at(0), at(1), at(2))),
        # Attempts end out of order: what started last decides.
        ([(2, False), (1, True), (3, False)], (at(1), at(2), at(3))),
        ([(3, True), (2, False), (1, False)], (at(3), None, None)),
    ],
)
def test_a_batch_tells_each_webhook_its_streak(
    verdicts: list[tuple[float, bool]],
    expected: tuple[datetime | None, datetime | None, datetime | None],
) -> None:
    seen = [Seen("wh_a", at(t), ok) for t, ok in verdicts]
    assert streaks(seen) == [Streak("wh_a", *expected)]


def test_streaks_are_per_webhook() -> None:
    seen = [Seen("wh_a", at(0), False), Seen("wh_b", at(1), True), Seen("wh_a", at(2), False)]
    assert sorted(streaks(seen), key=lambda s: s.webhook_id) == [
        Streak("wh_a", None, at(0), at(2)),
        Streak("wh_b", at(1), None, None),
    ]


@pytest.mark.parametrize(
    ("raw", "seconds"), [("", 5 * 86400.0), ("2", 2.0), ("1.5", 1.5), ("36h", 129600.0)]
)
def test_disable_after(raw: str, seconds: float) -> None:
    env = {"CARGOLINT_DISABLE_AFTER": raw} if raw else {}
    assert Settings.from_env(env).disable_after == seconds


@pytest.mark.parametrize("raw", ["soon", "-1", "0", "0s", "5 days"])
def test_disable_after_errors_name_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"CARGOLINT_DISABLE_AFTER": raw})
    assert caught.value.variable == "CARGOLINT_DISABLE_AFTER"
    assert str(caught.value).startswith("CARGOLINT_DISABLE_AFTER: ")

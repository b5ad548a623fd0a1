"""Retry schedule arithmetic: durations, jitter and Retry-After, all pure.

The schedule lists the waits after the first, second, ... failed attempt; its length plus one
is the number of attempts in all. A resent delivery starts the schedule afresh while its attempt
numbers keep counting: `retry_base` is the number of attempts made before the current schedule.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from random import Random

__all__ = [
    "DEFAULT_SCHEDULE",
    "JITTER",
    "RETRY_AFTER_CAP",
    "max_attempts",
    "next_delay",
    "parse_duration",
    "parse_retry_after",
    "parse_schedule",
]

# 5s, 5m, 30m, 2h, 5h, 10h, 10h: 8 attempts in all (docs/contract.md §4).
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
RETRY_AFTER_CAP = 3600.0
# Jitter only ever lengthens a wait, so a retry never comes earlier than the schedule promises.
JITTER = 0.1

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """`"200ms"`, `"5s"`, `"5m"`, `"2h"` or a bare number of seconds → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text.strip()!r} is not a duration such as 200ms, 5s, 5m or 2h")
    value, unit = match.groups()
    seconds = float(value) * _UNITS[unit or "s"]
    if not math.isfinite(seconds):  # "999…9" overflows to inf, which no clock can add
        raise ValueError(f"{text.strip()!r} is too long a duration")
    return seconds


def parse_schedule(text: str) -> tuple[float, ...]:
    """A comma-separated list of durations → the waits between attempts."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("must list at least one duration, such as 5s,5m,30m")
    return tuple(parse_duration(p) for p in parts)


def max_attempts(schedule: tuple[float, ...]) -> int:
    """How many attempts a delivery gets in all."""
    return len(schedule) + 1


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) → seconds from `now`, capped at 1 h.

    Anything unparseable is ignored (None), as a receiver's typo must not stall retries.
    """
    if not value:
        return None
    value = value.strip()
    # isascii: str.isdigit() also takes "²", which float() then refuses.
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), RETRY_AFTER_CAP)


def next_delay(
    attempts_made: int,
    schedule: tuple[float, ...],
    *,
    retry_base: int = 0,
    retry_after: float | None = None,
    rng: Random | None = None,
) -> float | None:
    """Seconds to wait before the next attempt, or None when no attempt is left.

    `attempts_made` counts attempts so far (1 after the first), `retry_base` those made before
    the current schedule began (a resent delivery's earlier attempts): the step in the schedule
    is their difference. The wait is the scheduled one lengthened by up to JITTER, or the
    Retry-After delay if that is longer.
    """
    step = attempts_made - retry_base
    if step < 1 or step > len(schedule):
        return None
    scheduled = schedule[step - 1]
    jitter = (rng or _rng).uniform(0.0, JITTER) * scheduled
    delay = scheduled + jitter
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


_rng = Random()

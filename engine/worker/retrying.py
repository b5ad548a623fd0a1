"""Riding out Postgres outages: the one module that knows tenacity.

A write the worker must not lose (a batch of new deliveries, a batch of attempts) is retried
with capped exponential backoff and jitter while the database is unreachable. Anything else —
a constraint violation, a bug — is raised at once. `REJECTED` names the errors by which
Postgres refuses the data itself: retrying those cannot help, the caller must set the data aside.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

__all__ = ["REJECTED", "TRANSIENT", "retry_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection lost or refused, server shutting down or starting up, pool closed under us.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    # Raised by the pool when it resets a connection the server has just killed.
    asyncpg.exceptions.InternalClientError,
)

# Postgres refuses the rows themselves (SQLSTATE classes 22, 23, 54): a value it cannot store, a
# constraint violated, an index row too large. Not an outage, and not a statement of ours that
# is wrong everywhere (an undefined table or column, say): the same rows fail on every retry.
REJECTED: tuple[type[asyncpg.PostgresError], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "database unavailable, retrying",
            extra={
                "operation": what,
                "attempt": state.attempt_number,
                "retry_in_s": round(wait, 2),
                "error": f"{type(exc).__name__}: {exc}",
            },
        )

    return before_sleep


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    give_up_after: float | None = None,
    max_wait: float = 5.0,
) -> T:
    """Run `operation` until it succeeds, retrying only transient database faults.

    With `give_up_after` (seconds) the last error is raised once that much time has passed;
    without it this retries until cancelled.
    """
    # Nearly every call succeeds at once: try before building a retrier (about 1% of the
    # worker's CPU under load). A first transient failure is retried at once by the retrier,
    # which suits a connection cut: the pool hands out a fresh one.
    try:
        return await operation()
    except TRANSIENT as exc:
        log.warning(
            "database unavailable, retrying",
            extra={
                "operation": what,
                "attempt": 1,
                "retry_in_s": 0.0,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential_jitter(multiplier=0.05, max=max_wait, jitter=0.1),
        stop=stop_never if give_up_after is None else stop_after_delay(give_up_after),
        before_sleep=_log_retry(what),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await operation()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

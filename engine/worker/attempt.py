"""One delivery attempt: the webhook as it is now, the signed request, its recorded outcome.

Just before an attempt the webhook is looked up in the cache: the attempt uses its current URL
and secret, and a deleted or deactivated webhook ends the delivery `failed` with no request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from engine.core.payload import build_body
from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.store.webhooks import WebhookTarget
from engine.worker.admission import Endpoint
from engine.worker.cache import SubscriptionCache
from engine.worker.job import Job
from engine.worker.metrics import Metrics
from engine.worker.recorder import Recorder

__all__ = ["INTERNAL", "AttemptRunner"]

log = logging.getLogger(__name__)

# The error class of an attempt that failed inside the worker rather than at the receiver.
INTERNAL = "internal"


class AttemptRunner:
    """Makes the dispatcher's attempts: `run(ep, job)`, in a task of its own.

    When the attempt ends, however it ends, `ended(ep, account, succeeded)` is called:
    `succeeded` is None when the attempt says nothing about the endpoint (no request was made,
    or it failed inside the worker).
    """

    def __init__(
        self,
        *,
        cache: SubscriptionCache,
        sender: Sender,
        recorder: Recorder,
        metrics: Metrics,
        ended: Callable[[Endpoint, str, bool | None], None],
    ) -> None:
        self._cache = cache
        self._sender = sender
        self._recorder = recorder
        self._metrics = metrics
        self._ended = ended

    async def run(self, ep: Endpoint, job: Job) -> None:
        succeeded: bool | None = None
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
                succeeded = outcome.succeeded
        finally:
            self._ended(ep, job.event.account_id, succeeded)


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

"""The Webhooks API's handlers (docs/contract.md §1). Auth has run before any of these."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import orjson
from aiohttp import web

from engine.api.auth import principal
from engine.api.destination import check_destination
from engine.api.errors import ApiError
from engine.api.requests import (
    json_response,
    read_json,
    read_optional_json,
    webhook_id_of,
    webhook_not_found,
)
from engine.api.state import BOX, DNS, POOL, SENDER, SETTINGS, TEST_WRITES
from engine.api.validation import parse_create, parse_page, parse_rotation, parse_update
from engine.core.events import Event
from engine.core.ids import delivery_id, new_id
from engine.core.payload import build_body, sample_data
from engine.core.signing import request_headers
from engine.core.times import rfc3339
from engine.delivery import Outcome
from engine.store import deliveries, webhooks

__all__ = ["routes"]

log = logging.getLogger(__name__)


async def create_webhook(request: web.Request) -> web.Response:
    who = principal(request)
    settings = request.app[SETTINGS]
    spec = parse_create(await read_json(request), allow_http=settings.allow_http)
    await check_destination(spec.url, settings.allowed_networks, request.app[DNS])
    try:
        async with request.app[POOL].acquire() as conn:
            row, secret = await webhooks.create_webhook(
                conn,
                account_id=who.account_id,
                mode=who.mode,
                url=spec.url,
                events=spec.events,
                active=spec.active,
                description=spec.description,
                box=request.app[BOX],
                limit=settings.max_webhooks_per_account,
            )
    except webhooks.WebhookLimitError as exc:
        raise ApiError(409, "webhook_limit_reached", str(exc)) from None
    log.info(
        "webhook created",
        extra={"webhook_id": row["id"], "account_id": who.account_id, "mode": who.mode},
    )
    return json_response(webhooks.webhook_json(row, secret=secret), status=201)


async def list_webhooks(request: web.Request) -> web.Response:
    who = principal(request)
    offset, limit = parse_page(request.query)
    async with request.app[POOL].acquire() as conn:
        rows, total = await webhooks.list_webhooks(
            conn, account_id=who.account_id, mode=who.mode, offset=offset, limit=limit
        )
    data = [webhooks.webhook_json(r) for r in rows]
    return json_response({"data": data, "offset": offset, "limit": limit, "total": total})


async def get_webhook(request: web.Request) -> web.Response:
    who = principal(request)
    webhook_id = webhook_id_of(request)
    async with request.app[POOL].acquire() as conn:
        row = await webhooks.get_webhook(
            conn, account_id=who.account_id, mode=who.mode, webhook_id=webhook_id
        )
    if row is None:
        raise webhook_not_found(webhook_id)
    return json_response(webhooks.webhook_json(row))


async def update_webhook(request: web.Request) -> web.Response:
    who = principal(request)
    webhook_id = webhook_id_of(request)
    settings = request.app[SETTINGS]
    changes = parse_update(await read_json(request), allow_http=settings.allow_http)
    if "url" in changes:
        await check_destination(changes["url"], settings.allowed_networks, request.app[DNS])
    async with request.app[POOL].acquire() as conn:
        row = await webhooks.update_webhook(
            conn,
            account_id=who.account_id,
            mode=who.mode,
            webhook_id=webhook_id,
            changes=changes,
        )
    if row is None:
        raise webhook_not_found(webhook_id)
    log.info("webhook updated", extra={"webhook_id": webhook_id, "fields": sorted(changes)})
    return json_response(webhooks.webhook_json(row))


async def delete_webhook(request: web.Request) -> web.Response:
    who = principal(request)
    webhook_id = webhook_id_of(request)
    async with request.app[POOL].acquire() as conn:
        deleted = await webhooks.delete_webhook(
            conn, account_id=who.account_id, mode=who.mode, webhook_id=webhook_id
        )
    if not deleted:
        raise webhook_not_found(webhook_id)
    log.info("webhook deleted", extra={"webhook_id": webhook_id})
    return web.Response(status=204)


async def test_webhook(request: web.Request) -> web.Response:
    """Make one real, signed delivery now and return its record. Inactive webhooks too."""
    who = principal(request)
    webhook_id = webhook_id_of(request)
    pool = request.app[POOL]
    target = await webhooks.load_one(pool, webhook_id, request.app[BOX])
    if target is None or (target.account_id, target.mode) != (who.account_id, who.mode):
        raise webhook_not_found(webhook_id)
    # Opened before anything is recorded: a secret this API cannot open leaves no delivery.
    secret, next_secret = target.signing_secrets(datetime.now(UTC))

    event_type = target.events[0]
    event = Event(
        id=new_id("evt_test"),
        type=event_type,
        account_id=target.account_id,
        mode=target.mode,
        timestamp=rfc3339(datetime.now(UTC)),
        data=orjson.dumps(sample_data(event_type)),
    )
    dlv_id = delivery_id(target.id, target.account_id, event.id)
    # One statement: the event and its delivery land together without a transaction.
    await deliveries.insert_events_and_deliveries(
        pool,
        [event],
        [deliveries.NewDelivery(dlv_id, target.id, event, is_test=True)],
        claimed_by=None,
    )
    body = build_body(
        event_type=event_type,
        timestamp=event.timestamp,
        webhook_id=target.id,
        delivery_id=dlv_id,
        data=event.data,
        test=True,
    )
    headers = request_headers(
        secret=secret,
        body=body,
        event_type=event_type,
        delivery_id=dlv_id,
        next_secret=next_secret,
    )
    attempted_at = datetime.now(UTC)
    try:
        outcome = await request.app[SENDER].send(target.url, body, headers)
    except asyncio.CancelledError:
        # The API is stopping under a slow receiver: end the record rather than leave it
        # pending for good (no worker ever retries a test delivery).
        elapsed = int((datetime.now(UTC) - attempted_at).total_seconds() * 1000)
        stopped = Outcome(False, None, elapsed, "cancelled", "the API stopped mid-attempt")
        await _record(request.app, [_test_attempt(dlv_id, attempted_at, stopped)])
        raise
    record = _test_attempt(dlv_id, attempted_at, outcome)
    await _record(request.app, [record])
    row = await deliveries.get_delivery(pool, dlv_id)
    assert row is not None  # noqa: S101 - inserted above, never deleted
    log.info(
        "test delivery made",
        extra={
            "webhook_id": target.id,
            "delivery_id": dlv_id,
            "outcome": record.status,
            "response_status": outcome.status,
            "error_class": outcome.error_class,
        },
    )
    return json_response(deliveries.delivery_json(row))


async def _record(app: web.Application, records: list[deliveries.AttemptRecord]) -> None:
    """Write a test delivery's attempt. Shielded, so a client that hangs up or a shutdown
    cancelling the handler cannot leave it half-written, and tracked, so shutdown waits for it
    before the pool closes."""
    write = asyncio.ensure_future(deliveries.record_attempts(app[POOL], records))
    writes = app[TEST_WRITES]
    writes.add(write)
    write.add_done_callback(writes.discard)
    await asyncio.shield(write)


def _test_attempt(
    dlv_id: str, attempted_at: datetime, outcome: Outcome
) -> deliveries.AttemptRecord:
    """A test delivery's one attempt: it ends the delivery, which is never retried."""
    return deliveries.AttemptRecord(
        delivery_id=dlv_id,
        number=1,
        attempted_at=attempted_at,
        response_status=outcome.status,
        response_time_ms=outcome.elapsed_ms,
        error_class=outcome.error_class,
        error=outcome.error,
        response_body=outcome.body,
        status="succeeded" if outcome.succeeded else "failed",
        next_attempt_at=None,
    )


async def rotate_secret(request: web.Request) -> web.Response:
    """Make a new signing secret (shown once); the previous one keeps signing for the overlap."""
    who = principal(request)
    webhook_id = webhook_id_of(request)
    overlap = parse_rotation(await read_optional_json(request))
    async with request.app[POOL].acquire() as conn:
        rotated = await webhooks.rotate_secret(
            conn,
            account_id=who.account_id,
            mode=who.mode,
            webhook_id=webhook_id,
            overlap_seconds=overlap,
            box=request.app[BOX],
        )
    if rotated is None:
        raise webhook_not_found(webhook_id)
    row, secret = rotated
    log.info("webhook secret rotated", extra={"webhook_id": webhook_id, "overlap_s": overlap})
    return json_response(webhooks.webhook_json(row, secret=secret))


routes = [
    web.post("/api/v1/webhooks", create_webhook),
    web.get("/api/v1/webhooks", list_webhooks),
    web.get("/api/v1/webhooks/{id}", get_webhook),
    web.put("/api/v1/webhooks/{id}", update_webhook),
    web.delete("/api/v1/webhooks/{id}", delete_webhook),
    web.post("/api/v1/webhooks/{id}/test", test_webhook),
    web.post("/api/v1/webhooks/{id}/rotate-secret", rotate_secret),
]

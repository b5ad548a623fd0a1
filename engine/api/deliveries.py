"""The deliveries of a webhook: the list, one delivery in full, resend and recover.

Order of checks on every route here, after authentication: a malformed webhook or delivery id
(404), the query or body (400/413/415), whether the webhook is the key's own (404), whether the
delivery is the webhook's (404), then, to resend: the webhook is active (409
`webhook_inactive`), the delivery is not a test (409 `not_resendable`), it has ended (409
`delivery_pending`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from engine.api.auth import principal
from engine.api.errors import ApiError
from engine.api.requests import (
    delivery_id_of,
    delivery_not_found,
    json_response,
    read_optional_json,
    webhook_id_of,
    webhook_not_found,
)
from engine.api.state import POOL, SETTINGS
from engine.api.validation import parse_delivery_filter, parse_empty, parse_page, parse_recover
from engine.core.times import rfc3339
from engine.store import deliveries, resending, webhooks
from engine.store.accounts import Principal
from engine.store.detail import get_delivery_detail

__all__ = ["RESPONSE_BODY_SHOWN", "routes"]

log = logging.getLogger(__name__)

RESPONSE_BODY_SHOWN = 4096  # bytes of a receiver's answer an attempt log shows

_CONFLICTS = {
    resending.Refusal.WEBHOOK_INACTIVE: (
        "webhook_inactive",
        "the webhook is inactive; re-enable it (PUT active: true) to resend its deliveries",
    ),
    resending.Refusal.NOT_RESENDABLE: (
        "not_resendable",
        "a test delivery is attempted once and cannot be resent; make a new one with /test",
    ),
    resending.Refusal.DELIVERY_PENDING: (
        "delivery_pending",
        "the delivery is still pending: it will be attempted again on its own",
    ),
}


async def _ensure_own_webhook(conn: webhooks.Conn, who: Principal, webhook_id: str) -> None:
    """404 unless the webhook exists for the key's account and mode."""
    found = await webhooks.get_webhook(
        conn, account_id=who.account_id, mode=who.mode, webhook_id=webhook_id
    )
    if found is None:
        raise webhook_not_found(webhook_id)


async def list_webhook_deliveries(request: web.Request) -> web.Response:
    who = principal(request)
    webhook_id = webhook_id_of(request)
    offset, limit = parse_page(request.query)
    filters = parse_delivery_filter(request.query)
    async with request.app[POOL].acquire() as conn:
        await _ensure_own_webhook(conn, who, webhook_id)
        rows, total = await deliveries.list_deliveries(
            conn, webhook_id, filters, offset=offset, limit=limit
        )
    data = [deliveries.delivery_json(r) for r in rows]
    return json_response({"data": data, "offset": offset, "limit": limit, "total": total})


def _shown(body: str | None) -> str | None:
    """At most RESPONSE_BODY_SHOWN bytes of UTF-8, cut on a character boundary."""
    if body is None or len(body) <= RESPONSE_BODY_SHOWN // 4:
        return body
    return body.encode()[:RESPONSE_BODY_SHOWN].decode(errors="ignore")


def _attempt_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "number": row["number"],
        "attemptedAt": rfc3339(row["attempted_at"]),
        "responseStatus": row["response_status"],
        "responseTimeMs": row["response_time_ms"],
        "error": row["error"],
        "responseBody": _shown(row["response_body"]),
    }


async def get_delivery(request: web.Request) -> web.Response:
    """The delivery record, the body it carries, and every attempt oldest first."""
    who = principal(request)
    webhook_id = webhook_id_of(request)
    dlv_id = delivery_id_of(request)
    async with request.app[POOL].acquire() as conn:
        await _ensure_own_webhook(conn, who, webhook_id)
        detail = await get_delivery_detail(conn, webhook_id, dlv_id)
    if detail is None:
        raise delivery_not_found(dlv_id)
    body = deliveries.delivery_json(detail.record)
    # The body as sent, byte for byte, rather than decoded and encoded again.
    body["payload"] = None if detail.body is None else orjson.Fragment(detail.body)
    body["attemptLog"] = [_attempt_json(a) for a in detail.attempts]
    return json_response(body)


async def retry_delivery(request: web.Request) -> web.Response:
    """Send an ended delivery again: pending, a fresh retry schedule, due now."""
    who = principal(request)
    webhook_id = webhook_id_of(request)
    dlv_id = delivery_id_of(request)
    parse_empty(await read_optional_json(request))
    async with request.app[POOL].acquire() as conn:
        outcome = await resending.resend(
            conn,
            account_id=who.account_id,
            mode=who.mode,
            webhook_id=webhook_id,
            delivery_id=dlv_id,
        )
    if isinstance(outcome, resending.Resent):
        log.info("delivery resent", extra={"webhook_id": webhook_id, "delivery_id": dlv_id})
        return json_response(deliveries.delivery_json(outcome.record), status=202)
    if outcome is resending.Refusal.WEBHOOK_NOT_FOUND:
        raise webhook_not_found(webhook_id)
    if outcome is resending.Refusal.DELIVERY_NOT_FOUND:
        raise delivery_not_found(dlv_id)
    code, message = _CONFLICTS[outcome]
    raise ApiError(409, code, message)


async def recover_deliveries(request: web.Request) -> web.Response:
    """Resend every failed delivery created in [since, until) in one statement."""
    who = principal(request)
    webhook_id = webhook_id_of(request)
    since, until = parse_recover(await read_optional_json(request), datetime.now(UTC))
    async with request.app[POOL].acquire() as conn:
        outcome = await resending.recover(
            conn,
            account_id=who.account_id,
            mode=who.mode,
            webhook_id=webhook_id,
            since=since,
            until=until,
            rate=request.app[SETTINGS].endpoint_rate,
        )
    if outcome is resending.Refusal.WEBHOOK_NOT_FOUND:
        raise webhook_not_found(webhook_id)
    if isinstance(outcome, resending.Refusal):
        code, message = _CONFLICTS[outcome]
        raise ApiError(409, code, message)
    log.info("deliveries recovered", extra={"webhook_id": webhook_id, "recovered": outcome})
    return json_response({"recovered": outcome}, status=202)


routes = [
    web.get("/api/v1/webhooks/{id}/deliveries", list_webhook_deliveries),
    web.get("/api/v1/webhooks/{id}/deliveries/{deliveryId}", get_delivery),
    web.post("/api/v1/webhooks/{id}/deliveries/{deliveryId}/retry", retry_delivery),
    web.post("/api/v1/webhooks/{id}/recover", recover_deliveries),
]

"""Authentication, plan gating and per-key rate limiting: the first work on every /api/v1 route.

401 for a missing or unknown key, 403 `plan_required` for a plan without webhooks, 429
`rate_limited` with Retry-After once a key exceeds its rate. Only then does a handler run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from engine.api.errors import ApiError
from engine.api.state import LIMITER, POOL, PRINCIPAL
from engine.store.accounts import Principal, authenticate

__all__ = [
    "PLAN_MESSAGE",
    "auth_middleware",
    "principal",
]

PLAN_MESSAGE = "Webhook access is available on Business and Enterprise plans"
WEBHOOK_PLANS = frozenset({"business", "enterprise"})
PUBLIC_PATHS = frozenset({"/api/v1/openapi.json"})
API_PREFIX = "/api/v1/"


def principal(request: web.Request) -> Principal:
    """The authenticated principal of an /api/v1 request."""
    return request[PRINCIPAL]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "X-API-Key"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if not (path.startswith(API_PREFIX) or path == API_PREFIX.rstrip("/")):
        return await handler(request)
    if path in PUBLIC_PATHS:
        return await handler(request)
    key = request.headers.get("X-API-Key", "").strip()
    if not key:
        raise _unauthorized("missing X-API-Key header")
    pool: asyncpg.Pool[Any] = request.app[POOL]
    found = await authenticate(pool, key)
    if found is None:
        raise _unauthorized("unknown API key")
    if found.plan not in WEBHOOK_PLANS:
        raise ApiError(403, "plan_required", PLAN_MESSAGE)
    wait = request.app[LIMITER].wait(found.key_id, time.monotonic())
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests for this API key; retry in {seconds}s",
            headers={"Retry-After": str(seconds)},
        )
    request[PRINCIPAL] = found
    return await handler(request)

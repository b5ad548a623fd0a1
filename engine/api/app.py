"""The API application: middlewares, routes, shared resources, and `serve` for the CLI.

Middlewares run outermost first: metrics (sees the final status), errors (turns every failure
into the JSON error shape), auth (401/403/429 before any other work on /api/v1).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.api import catalogue, deliveries, handlers
from engine.api.auth import auth_middleware
from engine.api.errors import error_middleware
from engine.api.limits import KeyRateLimiter
from engine.api.metrics import ApiMetrics, metrics_middleware
from engine.api.requests import MAX_BODY
from engine.api.state import BOX, DNS, LIMITER, METRICS, POOL, SENDER, SETTINGS, TEST_WRITES
from engine.core.crypto import SecretBox
from engine.delivery import Sender
from engine.delivery.dns import HostLookups
from engine.settings import Settings
from engine.store.db import create_pool

__all__ = ["OPENAPI_PATH", "build_app", "serve"]

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"


def build_app(settings: Settings, *, pool: asyncpg.Pool[Any] | None = None) -> web.Application:
    """The API application. With `pool`, that pool is used (and left open); else one is made."""
    metrics = ApiMetrics()
    app = web.Application(
        middlewares=[metrics_middleware(metrics), error_middleware, auth_middleware],
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[BOX] = SecretBox(settings.secret_keys)
    app[LIMITER] = KeyRateLimiter(settings.api_rate_limit, settings.api_rate_burst)
    app.cleanup_ctx.append(_database(settings, pool))
    app.cleanup_ctx.append(_sender)
    app.cleanup_ctx.append(_lookups)
    openapi = OPENAPI_PATH.read_bytes()

    async def openapi_json(_: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_page(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.add_routes(handlers.routes)
    app.add_routes(deliveries.routes)
    app.add_routes(catalogue.routes)
    app.add_routes(
        [
            web.get("/api/v1/openapi.json", openapi_json),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics_page),
        ]
    )
    return app


def _database(
    settings: Settings, given: asyncpg.Pool[Any] | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def database(app: web.Application) -> AsyncIterator[None]:
        if given is not None:
            app[POOL] = given
            yield
            return
        pool = await create_pool(settings.database_url)
        app[POOL] = pool
        try:
            yield
        finally:
            await pool.close()

    return database


async def _sender(app: web.Application) -> AsyncIterator[None]:
    sender = Sender(app[SETTINGS])
    app[SENDER] = sender
    app[TEST_WRITES] = set()
    try:
        yield
    finally:
        # Handlers are done or cancelled by now; the records they started must still land.
        await asyncio.gather(*app[TEST_WRITES], return_exceptions=True)
        await sender.close()


async def _lookups(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    lookups = HostLookups(timeout=settings.dns_timeout, nameservers=settings.dns_servers)
    app[DNS] = lookups
    try:
        yield
    finally:
        await lookups.close()


async def serve(settings: Settings) -> None:
    """Serve the API on CARGOLINT_API_HOST:CARGOLINT_API_PORT until SIGTERM or SIGINT."""
    if not settings.secret_keys:
        log.warning(
            "CARGOLINT_SECRET_KEY is not set: webhook signing secrets are stored unencrypted"
        )
    runner = web.AppRunner(
        build_app(settings),
        access_log=None,
        # Long enough for a test delivery under way to finish (or be recorded as cut short).
        shutdown_timeout=max(settings.shutdown_grace, settings.delivery_timeout + 2),
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, settings.api_host, settings.api_port)
        await site.start()
        log.info("api listening", extra={"host": settings.api_host, "port": settings.api_port})
        await stop.wait()
        log.info("api stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()

"""`/metrics`, `/healthz` and `/readyz` on the worker's metrics port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.worker.metrics import Metrics

__all__ = ["HealthServer"]

Check = Callable[[], Awaitable[bool]]


class HealthServer:
    """Serves metrics and probes; `port` is the bound port once started (0 picks one)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        pool: asyncpg.Pool[Any],
        broker_connected: Callable[[], bool],
        cache_loaded: Callable[[], bool],
        host: str = "0.0.0.0",  # noqa: S104 - Prometheus and the kubelet reach it from outside
        port: int = 9100,
    ) -> None:
        self._metrics = metrics
        self._pool = pool
        self._broker_connected = broker_connected
        self._cache_loaded = cache_loaded
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        server: Any = site._server  # aiohttp exposes the bound sockets only here
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _database_ok(self) -> bool:
        try:
            async with asyncio.timeout(2.0):
                await self._pool.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = {
            "broker": self._broker_connected(),
            "database": await self._database_ok(),
            "cache": self._cache_loaded(),
        }
        ready = all(checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

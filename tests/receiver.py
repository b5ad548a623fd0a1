"""A real HTTPS webhook receiver for tests: records every request, answers as told."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["Received", "Receiver"]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """An aiohttp HTTPS server on 127.0.0.1. `handler` decides each answer (200 by default)."""

    ssl_context: ssl.SSLContext | None
    requests: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        loop = asyncio.get_running_loop()
        self.requests.append(Received(request.path, dict(request.headers), body, loop.time()))
        async with self._arrived:
            self._arrived.notify_all()
        if self.handler is not None:
            return await self.handler(request, body)
        return web.Response(status=200, text="ok")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` requests have arrived; return them all."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

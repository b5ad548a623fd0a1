"""HTTPS receivers for chaos runs: a counting one that can go down and come back on the same
port, and deliberately broken peers (a trickler, an endless body) written at the socket level.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["BrokenPeer", "CountingReceiver"]


class CountingReceiver:
    """Answers 200 (or what `decide` says) and counts answers per `X-CargoLint-Delivery`."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self.ok: Counter[str] = Counter()  # delivery id -> 2xx answers given
        self.failed: Counter[str] = Counter()
        self.ok_times: list[float] = []  # monotonic time of every 2xx answer
        self.decide: Callable[[str], Awaitable[int]] | None = None
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    async def start(self) -> CountingReceiver:
        """Start, on the same port as before if it ran already."""
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        delivery = request.headers.get("X-CargoLint-Delivery", "?")
        status = 200 if self.decide is None else await self.decide(delivery)
        if 200 <= status < 300:
            self.ok[delivery] += 1
            self.ok_times.append(time.monotonic())
        else:
            self.failed[delivery] += 1
        self._changed.set()
        return web.Response(status=status, text="ok" if status == 200 else "no")

    @property
    def delivered(self) -> int:
        """Distinct deliveries answered 2xx."""
        return len(self.ok)

    @property
    def duplicates(self) -> int:
        """2xx answers beyond the first for the same delivery."""
        return sum(self.ok.values()) - len(self.ok)

    async def wait_delivered(self, count: int, timeout: float) -> float:
        """Wait until `count` distinct deliveries were answered 2xx; return seconds waited."""
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            while self.delivered < count:
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic() - started

    def first_ok_after(self, moment: float) -> float | None:
        return next((t for t in self.ok_times if t >= moment), None)


class BrokenPeer:
    """A TLS server that reads the request, then misbehaves: `trickle` sends a valid response
    one byte a second; `endless` sends headers, then body chunks for as long as it is read."""

    def __init__(self, ssl_context: ssl.SSLContext, mode: str) -> None:
        assert mode in {"trickle", "endless"}
        self.ssl_context = ssl_context
        self.mode = mode
        self.port = 0
        self.connections = 0
        self.bytes_sent = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    async def start(self) -> BrokenPeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if self.mode == "trickle":
                    await self._trickle(writer)
                else:
                    await self._endless(writer)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _trickle(self, writer: asyncio.StreamWriter) -> None:
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        for byte in response:
            writer.write(bytes([byte]))
            await writer.drain()
            self.bytes_sent += 1
            await asyncio.sleep(1.0)

    async def _endless(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while True:
            writer.write(frame)
            await writer.drain()
            self.bytes_sent += len(chunk)
            # drain() returns without yielding while the socket takes the data, and a client's
            # RST shows up first as a failed send: without a yield, connection_lost never runs.
            await asyncio.sleep(0)

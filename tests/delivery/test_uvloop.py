"""The client on uvloop, the worker's loop: its TLS transport is not an asyncio.Transport.

The other tests here run on the session's asyncio loop; these run a few of the same cases in
their own uvloop loop (in a thread, as `cargolint-webhooks worker` runs one in its process).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from engine.delivery import Outcome, Sender
from engine.settings import Settings
from tests.delivery.conftest import LOOPBACK, Conn, RawServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"


def on_uvloop(main: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    def run() -> None:
        async def checked() -> None:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            await main()

        uvloop.run(checked())

    return run


async def test_keep_alive_chunked_and_timeouts_over_tls_on_uvloop(
    server_ssl: ssl.SSLContext, ca_file: Path
) -> None:
    seen: dict[str, int] = {}

    async def main() -> None:
        async def keep_alive(conn: Conn) -> None:
            await conn.serve(OK)

        async def chunked(conn: Conn) -> None:
            await conn.serve(CHUNKED)

        async def hang(conn: Conn) -> None:
            await conn.read_request()
            await conn.until_closed()

        settings = Settings(allowed_networks=LOOPBACK, ca_bundle=ca_file, delivery_timeout=0.5)
        servers = [await RawServer(h, server_ssl).start() for h in (keep_alive, chunked, hang)]
        try:
            async with Sender(settings) as sender:
                outcomes: list[Outcome] = [
                    await sender.send(servers[0].url + "/a", b"{}", {"X-A": "1"}) for _ in range(3)
                ]
                assert all(o.succeeded and o.body == "ok" for o in outcomes), outcomes
                chunk = await sender.send(servers[1].url, b"{}", {})
                assert (chunk.status, chunk.body) == (200, "hello"), chunk
                timeout = await sender.send(servers[2].url, b"{}", {})
                assert timeout.error_class == "timeout", timeout
            seen["connections"] = servers[0].accepted
        finally:
            for server in servers:
                await server.stop()

    await asyncio.to_thread(on_uvloop(main))
    assert seen == {"connections": 1}


async def test_an_unknown_certificate_is_a_tls_error_on_uvloop(
    server_ssl: ssl.SSLContext,
) -> None:
    async def main() -> None:
        async def keep_alive(conn: Conn) -> None:
            await conn.serve(OK)

        server = await RawServer(keep_alive, server_ssl).start()
        try:
            settings = Settings(allowed_networks=LOOPBACK, delivery_timeout=2.0)  # no test CA
            async with Sender(settings) as sender:
                outcome = await sender.send(server.url, b"{}", {})
            assert outcome.error_class == "tls", outcome
        finally:
            await server.stop()

    await asyncio.to_thread(on_uvloop(main))

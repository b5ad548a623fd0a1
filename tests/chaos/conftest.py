"""Chaos fixtures: a throwaway PostgreSQL and RabbitMQ per test, and TCP proxies to break.

Never the shared servers on 5432/5672: these run on free ports, in temp dirs, and are
stopped and deleted when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.receivers import CountingReceiver
from tests.chaos.run import REPORTS
from tests.chaos.services import TcpProxy, ThrowawayPostgres, ThrowawayRabbit


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    pg = ThrowawayPostgres().init()
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
async def throwaway_rabbit() -> AsyncIterator[ThrowawayRabbit]:
    rabbit = ThrowawayRabbit()
    try:
        # Blocking waits run in a thread so the session's event loop keeps serving receivers.
        await asyncio.to_thread(rabbit.start)
        yield rabbit
    finally:
        await asyncio.to_thread(rabbit.cleanup)


@pytest.fixture
async def pg_proxy(throwaway_pg: ThrowawayPostgres) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(throwaway_pg.port).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def rabbit_proxy(throwaway_rabbit: ThrowawayRabbit) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(throwaway_rabbit.port).start()
    yield proxy
    await proxy.close()


@dataclass(frozen=True)
class Stack:
    """A scenario's own servers, our CA and a directory for the worker logs."""

    pg: ThrowawayPostgres
    rabbit: ThrowawayRabbit
    ca_file: Path
    logdir: Path


@pytest.fixture
def stack(
    throwaway_pg: ThrowawayPostgres,
    throwaway_rabbit: ThrowawayRabbit,
    ca_file: Path,
    tmp_path: Path,
) -> Stack:
    return Stack(throwaway_pg, throwaway_rabbit, ca_file, tmp_path)


@pytest.fixture
async def counting_receiver(server_ssl: ssl.SSLContext) -> AsyncIterator[CountingReceiver]:
    receiver = await CountingReceiver(server_ssl).start()
    yield receiver
    await receiver.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every scenario's report line, even without -s."""
    if REPORTS:
        terminalreporter.section("chaos report")
        for report in REPORTS:
            terminalreporter.write_line(report.line())

"""Shared fixtures: a throwaway database, a RabbitMQ vhost, a trustme CA and HTTPS receivers.

Everything is real: the machine's Postgres and RabbitMQ, each test session in its own database
and vhost so parallel runs never see each other's rows or messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme

from engine.core.ids import random_token
from engine.settings import Settings
from engine.store.db import create_pool
from engine.store.migrate import migrate
from tests.receiver import Receiver

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", "::1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    name = f"cargolint_test_{random_token(10)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    await migrate(url)
    yield url
    await drop_database(name)


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost `name` guest may use, deleted at the end; yields its AMQP URL."""
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost for this test session, deleted at the end."""
    with fresh_vhost(f"cargolint_test_{random_token(10)}") as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, ca_file: Path) -> Settings:
    """Settings for tests: the session's database, receivers on 127.0.0.1 allowed, our CA."""
    return Settings(
        database_url=database_url,
        allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),),
        ca_bundle=ca_file,
        delivery_timeout=5.0,
        retry_schedule=(0.2, 0.4),
        poll_interval=0.1,
    )


@pytest.fixture(autouse=True)
async def _no_retries_left_behind(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After a test that used the session's database, end the deliveries it left pending.

    A later test's worker would otherwise take their retries up, to receivers long gone, and
    count their endpoints as failing: tests must not depend on the order they run in.
    """
    if "database_url" not in request.fixturenames:
        yield
        return
    pool: asyncpg.Pool[Any] = request.getfixturevalue("pool")
    yield
    await pool.execute(
        """UPDATE deliveries SET status = 'failed', next_attempt_at = NULL, claimed_by = NULL
           WHERE status = 'pending'"""
    )


def with_(settings: Settings, **changes: Any) -> Settings:
    """A copy of settings with some fields changed."""
    return dataclasses.replace(settings, **changes)


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await create_pool(database_url)
    yield pool
    await pool.close()


@pytest.fixture
async def receiver(server_ssl: ssl.SSLContext) -> AsyncIterator[Receiver]:
    """An HTTPS receiver on 127.0.0.1 with a certificate from the session's CA."""
    receiver = await Receiver(server_ssl).start()
    yield receiver
    await receiver.stop()

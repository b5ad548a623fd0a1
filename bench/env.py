"""The run's throwaway world: a trustme CA, a fresh database and a fresh RabbitMQ vhost.

Each is an async context manager that removes what it made even when the run fails, like the
test fixtures in tests/conftest.py. Nothing here touches the default database or the `/` vhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import trustme

from engine.core.ids import random_token
from engine.store.migrate import migrate

__all__ = ["PG_ADMIN", "Certificates", "certificates", "database", "vhost"]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql://postgres@127.0.0.1:5432/"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def certificates(folder: Path) -> Certificates:
    """A trustme CA and a server certificate for 127.0.0.1, written as PEM files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(paths.cert), append=True)
    server.private_key_pem.write_to_path(str(paths.key))
    return paths


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh, migrated database `cargolint_bench_…`, dropped at the end."""
    name = f"cargolint_bench_{random_token(10)}"
    url = PG_BASE + name
    try:
        await migrate(url)
        yield url
    finally:
        admin: asyncpg.Connection[Any] = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.asynccontextmanager
async def vhost() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost `cargolint_bench_…` for guest, deleted at the end."""
    name = f"cargolint_bench_{random_token(10)}"
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", name)
    try:
        await asyncio.to_thread(
            _rabbitmqctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"
        )
        yield AMQP_BASE + name
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_vhost", name)

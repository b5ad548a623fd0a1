"""Fixtures for the security tests: a private database for tests that rewrite every row."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine.core.ids import random_token
from tests.conftest import PG_ADMIN


@pytest.fixture
async def private_database_url(database_url: str) -> AsyncIterator[str]:
    """A sibling of the session's database on the same server, not yet created, dropped after.

    `migrate` with CARGOLINT_SECRET_KEY re-encrypts *every* webhook row, which would break other
    tests sharing the session database, so such tests get their own.
    """
    parts = urlsplit(database_url)
    name = f"{parts.path.lstrip('/')}_sec_{random_token(6)}"
    yield urlunsplit(parts._replace(path="/" + name))
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def columns_containing(conn: asyncpg.Connection[Any], needle: str) -> list[str]:
    """Every `table.column` in the public schema whose value contains `needle` anywhere."""
    found = []
    columns = await conn.fetch(
        """SELECT table_name, column_name, data_type FROM information_schema.columns
           WHERE table_schema = 'public'"""
    )
    for col in columns:
        table, column = col["table_name"], col["column_name"]
        if col["data_type"] == "bytea":
            where = f'position($1::bytea in "{column}") > 0'
            arg: Any = needle.encode()
        else:
            where = f'position($1 in "{column}"::text) > 0'
            arg = needle
        if await conn.fetchval(f'SELECT count(*) FROM "{table}" WHERE {where}', arg):
            found.append(f"{table}.{column}")
    return found


PYTHON = sys.executable

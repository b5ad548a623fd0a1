"""The real API on 127.0.0.1 (port 0), real Postgres, and helpers to make accounts and calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from engine.api.app import build_app
from engine.settings import Settings
from engine.store.accounts import create_account
from tests.conftest import with_


@dataclass(frozen=True)
class Account:
    id: str
    key: str


MakeAccount = Callable[..., Awaitable[Account]]


async def start_api(
    settings: Settings, pool: asyncpg.Pool[Any] | None
) -> tuple[web.AppRunner, str]:
    """Start the API app on an ephemeral port; return its runner and base URL."""
    runner = web.AppRunner(build_app(settings, pool=pool), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def api_settings(settings: Settings) -> Settings:
    # A generous rate limit: these tests are fast, and one test checks 429 on its own app.
    return with_(settings, api_rate_limit=10_000.0, api_rate_burst=10_000)


@pytest.fixture(scope="session")
async def api(api_settings: Settings, pool: asyncpg.Pool[Any]) -> AsyncIterator[str]:
    """Base URL of the API, shared by the session."""
    runner, url = await start_api(api_settings, pool)
    yield url
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def make_account(pool: asyncpg.Pool[Any]) -> MakeAccount:
    async def make(plan: str = "business", mode: str = "test") -> Account:
        async with pool.acquire() as conn:
            account_id, key = await create_account(conn, name="Acme", plan=plan, mode=mode)
        return Account(account_id, key)

    return make


@pytest.fixture
async def account(make_account: MakeAccount) -> Account:
    return await make_account()


class Client:
    """Calls the API with one key; returns (status, parsed JSON or None, headers)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, key: str | None) -> None:
        self.http = http
        self.base = base
        self.key = key

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        all_headers = {"X-API-Key": self.key} if self.key else {}
        all_headers.update(headers or {})
        async with self.http.request(
            method,
            self.base + path,
            json=json,
            data=data,
            headers=all_headers,
            params=params,
        ) as response:
            raw = await response.read()
            body = None
            if raw:
                assert response.content_type == "application/json", raw[:200]
                body = await response.json()
            return response.status, body, response.headers

    async def create(self, url: str, events: list[str] | None = None, **fields: Any) -> Any:
        status, body, _ = await self.call(
            "POST",
            "/api/v1/webhooks",
            json={"url": url, "events": events or ["document.uploaded"], **fields},
        )
        assert status == 201, body
        return body


@pytest.fixture
def client(http: aiohttp.ClientSession, api: str, account: Account) -> Client:
    return Client(http, api, account.key)

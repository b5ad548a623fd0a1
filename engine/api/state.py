"""Typed keys for the API application's shared state, set up in `app.build_app`."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aiohttp import web

from engine.api.limits import KeyRateLimiter
from engine.api.metrics import ApiMetrics
from engine.core.crypto import SecretBox
from engine.delivery import Sender
from engine.delivery.dns import HostLookups
from engine.settings import Settings
from engine.store.accounts import Principal

__all__ = [
    "BOX",
    "DNS",
    "LIMITER",
    "METRICS",
    "POOL",
    "PRINCIPAL",
    "SENDER",
    "SETTINGS",
    "TEST_WRITES",
]

SETTINGS = web.AppKey("settings", Settings)
POOL: web.AppKey[asyncpg.Pool[Any]] = web.AppKey("pool")
SENDER = web.AppKey("sender", Sender)
# Test-delivery records being written: shutdown waits for them before closing the pool.
TEST_WRITES: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("test_writes")
BOX = web.AppKey("box", SecretBox)
# Host-name lookups for the creation check, shared so concurrent checks of a name share a query.
DNS = web.AppKey("dns", HostLookups)
METRICS = web.AppKey("metrics", ApiMetrics)
LIMITER = web.AppKey("limiter", KeyRateLimiter)
PRINCIPAL = web.RequestKey("principal", Principal)

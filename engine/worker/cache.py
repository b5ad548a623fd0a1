"""The subscription cache: (account, mode, event type) → active webhooks, O(1) per event.

Loaded in full at start, kept fresh by `LISTEN cargolint_webhooks` (the API notifies the id of
every webhook it changes, after commit), and reloaded in full every `cache_reload_interval` as a
safety net. When the listening connection drops, it reconnects and reloads in full, since
notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import asyncpg

from engine.core.crypto import SecretBox
from engine.settings import Settings
from engine.store.db import NOTIFY_CHANNEL, connect
from engine.store.webhooks import WebhookTarget, load_active, load_one
from engine.worker.metrics import Metrics
from engine.worker.retrying import TRANSIENT

__all__ = ["SubscriptionCache"]

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (account id, mode, event type)


class SubscriptionCache:
    """Active webhooks by subscription key and by id. Use `start()` / `close()`."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool[Any], metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._box = SecretBox(settings.secret_keys)
        self._by_id: dict[str, WebhookTarget] = {}
        self._by_key: dict[Key, tuple[WebhookTarget, ...]] = {}
        self._loaded = asyncio.Event()
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._reloading = False
        self._refreshed_during_reload: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._listen_conn: asyncpg.Connection[Any] | None = None
        self._listening = asyncio.Event()

    # -- reads (the hot path) -------------------------------------------------------------

    def match(self, account_id: str, mode: str, event_type: str) -> tuple[WebhookTarget, ...]:
        """The active webhooks an event of this kind goes to."""
        return self._by_key.get((account_id, mode, event_type), ())

    def get(self, webhook_id: str) -> WebhookTarget | None:
        """The webhook if it is active and not deleted, else None."""
        return self._by_id.get(webhook_id)

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def __len__(self) -> int:
        return len(self._by_id)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen first, then load, so no change between the two can be missed."""
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="cache-listen"),
            asyncio.create_task(self._apply_changes(), name="cache-changes"),
            asyncio.create_task(self._reload_periodically(), name="cache-reload"),
        ]
        await self._listening.wait()
        await self.reload()

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """Listening, applying changes and periodic reloads, while started: until `close()`."""
        return tuple(self._tasks)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._listen_conn is not None:
            await self._listen_conn.close()
            self._listen_conn = None

    # -- full reloads ---------------------------------------------------------------------

    async def reload(self) -> None:
        """Replace the whole cache with what Postgres holds now."""
        started = time.perf_counter()
        self._reloading = True
        self._refreshed_during_reload = set()
        try:
            targets = await load_active(self._pool, self._box)
        finally:
            self._reloading = False
        by_id = {t.id: t for t in targets}
        self._by_id = by_id
        self._by_key = _index(by_id.values())
        # A change notified while the load ran may be newer than what it read: apply it again.
        self._dirty |= self._refreshed_during_reload
        self._dirty_event.set()
        elapsed = time.perf_counter() - started
        self._metrics.cache_reload_duration.observe(elapsed)
        self._metrics.cache_last_reload.set(time.time())
        self._metrics.cache_webhooks.set(len(by_id))
        self._loaded.set()
        log.info("subscription cache loaded", extra={"webhooks": len(by_id), "seconds": elapsed})

    async def _reload_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.cache_reload_interval)
            try:
                await self.reload()
            except TRANSIENT as exc:
                self._metrics.cache_reload_failures.inc()
                log.warning("subscription cache reload failed", extra={"error": str(exc)})
            except Exception:  # keep the cache we have, and try again next time
                self._metrics.cache_reload_failures.inc()
                log.exception("subscription cache reload failed")

    # -- LISTEN / NOTIFY ------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self._dirty.add(str(payload))
        self._dirty_event.set()

    def _on_terminate(self, _conn: object) -> None:
        self._listening.clear()

    async def _listen_forever(self) -> None:
        """Hold a LISTEN connection; on loss, reconnect with backoff and reload in full."""
        delay = 0.1
        first = True
        while True:
            try:
                conn = await connect(self._settings.database_url)
                self._listen_conn = conn
                conn.add_termination_listener(self._on_terminate)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            except TRANSIENT as exc:
                log.warning("cannot listen for webhook changes", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._listening.set()
            delay = 0.1
            if not first:
                log.info("listening for webhook changes again")
                with contextlib.suppress(*TRANSIENT):
                    await self.reload()
            first = False
            while not conn.is_closed():
                # asyncpg reports a dropped socket through the termination listener, but only
                # once it reads; a cheap query every second makes a silent loss show quickly.
                await asyncio.sleep(1.0)
                with contextlib.suppress(*TRANSIENT):
                    await conn.execute("SELECT 1", timeout=5)
            conn.terminate()
            self._listen_conn = None
            log.warning("lost the webhook change listener; reconnecting")

    async def _apply_changes(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            if self._reloading:
                continue  # reload() sets the event again when it is done
            ids, self._dirty = self._dirty, set()
            for webhook_id in ids:
                try:
                    await self.refresh(webhook_id)
                except TRANSIENT:
                    # The next full reload (after a reconnect or on schedule) catches it up.
                    self._dirty.add(webhook_id)
                    await asyncio.sleep(0.5)
                    self._dirty_event.set()
                    break

    async def refresh(self, webhook_id: str) -> WebhookTarget | None:
        """Reload one webhook from Postgres; return it if active, else drop it."""
        target = await load_one(self._pool, webhook_id, self._box)
        if target is not None and not target.active:
            target = None
        if self._reloading:
            self._refreshed_during_reload.add(webhook_id)
        old = self._by_id.get(webhook_id)
        if target is None and old is None:
            return None
        if target is None:
            del self._by_id[webhook_id]
        else:
            self._by_id[webhook_id] = target
        self._reindex(old, target)
        self._metrics.cache_webhooks.set(len(self._by_id))
        log.debug("webhook refreshed", extra={"webhook_id": webhook_id, "active": bool(target)})
        return target

    def _reindex(self, old: WebhookTarget | None, new: WebhookTarget | None) -> None:
        """Update only the keys the old and new versions of one webhook touch."""
        keys: set[Key] = set()
        for t in (old, new):
            if t is not None:
                keys.update((t.account_id, t.mode, e) for e in t.events)
        for key in keys:
            kept = [t for t in self._by_key.get(key, ()) if old is None or t.id != old.id]
            if new is not None and key[2] in new.events:
                kept.append(new)
            if kept:
                self._by_key[key] = tuple(kept)
            else:
                self._by_key.pop(key, None)


def _index(targets: Any) -> dict[Key, tuple[WebhookTarget, ...]]:
    grouped: defaultdict[Key, list[WebhookTarget]] = defaultdict(list)
    for t in targets:
        for event_type in t.events:
            grouped[(t.account_id, t.mode, event_type)].append(t)
    return {k: tuple(v) for k, v in grouped.items()}

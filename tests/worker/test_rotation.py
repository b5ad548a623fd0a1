"""Secret rotation with an overlap (docs/contract.md §6), end to end with a real HTTPS receiver
that checks requests with the receiver-side snippet from the docs, run verbatim.

During the overlap every request — first attempts and retries — carries X-CargoLint-Signature
by the previous secret and X-CargoLint-Signature-Next by the new one; once it ends, only
X-CargoLint-Signature, by the new secret. The worker learns of the rotation by NOTIFY and ends
the overlap by its own clock at each attempt: no restart, no reload at the expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from engine.core.crypto import SecretBox
from engine.settings import Settings
from engine.store.webhooks import rotate_secret
from engine.worker.main import Worker
from tests.receiver import Receiver
from tests.worker.helpers import (
    Publisher,
    dlv,
    eventually,
    make_event,
    subscribed,
    verify_signature,
    wait_final,
)

SNIPPET = Path(__file__).resolve().parents[2] / "docs" / "receiver_rotation_snippet.py"
OVERLAP = 4  # seconds
# Requests this close to the overlap's end are not classified: the worker's clock decided.
MARGIN = 0.3

Verify = Callable[[str, str, Mapping[str, str]], bool]


def snippet() -> Verify:
    """The receiver-side snippet of the docs, executed as written."""
    namespace: dict[str, Any] = {}
    exec(compile(SNIPPET.read_text(), str(SNIPPET), "exec"), namespace)  # noqa: S102
    verify: Verify = namespace["verify"]
    return verify


async def rotate(
    pool: asyncpg.Pool[Any], settings: Settings, account_id: str, webhook_id: str, overlap: int
) -> tuple[str, datetime]:
    """Rotate the webhook's secret with an overlap, as the API does; return the new secret and
    when the previous one stops signing."""
    async with pool.acquire() as conn:
        rotated = await rotate_secret(
            conn,
            account_id=account_id,
            mode="live",
            webhook_id=webhook_id,
            overlap_seconds=overlap,
            box=SecretBox(settings.secret_keys),
        )
    assert rotated is not None
    row, secret = rotated
    expires_at: datetime = row["previous_secret_expires_at"]
    return secret, expires_at


def test_the_snippet_accepts_either_header_and_nothing_else() -> None:
    verify = snippet()
    body = '{"event":"document.uploaded"}'
    old, new = "whsec_live_" + "a" * 32, "whsec_live_" + "b" * 32

    def sign(secret: str) -> str:
        return "sha256=" + hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()

    overlap = {"X-CargoLint-Signature": sign(old), "X-CargoLint-Signature-Next": sign(new)}
    assert verify(old, body, overlap)
    assert verify(new, body, overlap)
    assert verify(new, body, {"X-CargoLint-Signature": sign(new)})
    assert not verify(old, body, {"X-CargoLint-Signature": sign(new)})
    assert not verify("whsec_live_" + "c" * 32, body, overlap)
    assert not verify(new, body + " ", overlap)
    assert not verify(new, body, {})
    assert not verify(new, body, {"X-CargoLint-Signature": "garbage"})


@pytest.mark.slow
async def test_a_rotation_signs_with_both_secrets_until_the_overlap_ends(
    worker: Worker,
    publisher: Publisher,
    receiver: Receiver,
    pool: asyncpg.Pool[Any],
    wsettings: Settings,
) -> None:
    verify = snippet()
    account, webhook_id, old = await subscribed(worker, pool, wsettings, receiver.url)
    held = old  # the secret the receiver holds: it switches during the overlap
    seen: list[tuple[float, dict[str, str], str]] = []
    answered: set[str] = set()

    async def check(request: web.Request, body: bytes) -> web.Response:
        seen.append((time.time(), dict(request.headers), body.decode()))
        delivery = request.headers["X-CargoLint-Delivery"]
        if delivery not in answered:  # every first attempt fails, so retries are signed too
            answered.add(delivery)
            return web.Response(status=503)
        return web.Response(status=200 if verify(held, body.decode(), request.headers) else 401)

    receiver.handler = check
    new, expires_at = await rotate(pool, wsettings, account, webhook_id, OVERLAP)
    await eventually(
        lambda: (t := worker.cache.get(webhook_id)) is not None and t.previous_sealed is not None
    )

    async def deliver() -> str:
        event = make_event(account)
        await publisher.publish(event)
        delivery_id = dlv(webhook_id, account, event)
        row = (await wait_final(pool, [delivery_id]))[delivery_id]
        # A receiver accepting either header rotates with no failed delivery.
        assert (row["status"], row["attempts"]) == ("succeeded", 2)
        return delivery_id

    await deliver()  # the receiver still holds the previous secret
    held = new
    await deliver()  # it has switched to the new one
    ends = expires_at.timestamp()
    await eventually(lambda: time.time() > ends + MARGIN, timeout=OVERLAP + 5.0, every=0.05)
    await deliver()
    await deliver()

    during = [(h, b) for at, h, b in seen if at < ends - MARGIN]
    after = [(h, b) for at, h, b in seen if at > ends + MARGIN]
    assert len(during) >= 4
    assert len(after) == 4
    for headers, body in during:
        # The previous secret, unchanged for receivers that have not switched (the public
        # docs' snippet), and the new one in -Next.
        assert verify_signature(old, body.encode(), headers["X-CargoLint-Signature"])
        assert verify_signature(new, body.encode(), headers["X-CargoLint-Signature-Next"])
    for headers, body in after:
        assert "X-CargoLint-Signature-Next" not in headers
        assert verify_signature(new, body.encode(), headers["X-CargoLint-Signature"])

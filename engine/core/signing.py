"""Webhook signatures (docs/contract.md §3): HMAC-SHA256 of the raw body, keyed by the secret."""

from __future__ import annotations

import hashlib
import hmac

from engine import __version__

__all__ = ["USER_AGENT", "request_headers", "sign", "verify"]

USER_AGENT = f"CargoLint-Webhooks/{__version__}"


def sign(secret: str, body: bytes) -> str:
    """The `X-CargoLint-Signature` value: `sha256=<hex>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """True when `signature` is the body's signature; compared in constant time."""
    # Bytes, not str: compare_digest raises TypeError on non-ASCII str, and a received header
    # may hold anything (aiohttp decodes headers with surrogateescape).
    presented = signature.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(sign(secret, body).encode(), presented)


def request_headers(
    *,
    secret: str,
    body: bytes,
    event_type: str,
    delivery_id: str,
    next_secret: str | None = None,
) -> dict[str, str]:
    """Every header of a webhook request.

    During a secret rotation's overlap `secret` is the previous secret, so receivers that have
    not switched keep verifying `X-CargoLint-Signature` unchanged, and `next_secret` (the new one)
    signs `X-CargoLint-Signature-Next`.
    """
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-CargoLint-Event": event_type,
        "X-CargoLint-Delivery": delivery_id,
        "X-CargoLint-Signature": sign(secret, body),
    }
    if next_secret is not None:
        headers["X-CargoLint-Signature-Next"] = sign(next_secret, body)
    return headers

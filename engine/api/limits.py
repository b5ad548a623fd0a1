"""Per-API-key request rate limiting (token buckets keyed by key id, never the key)."""

from __future__ import annotations

from engine.core.ratelimit import TokenBucket

__all__ = ["KeyRateLimiter"]


class KeyRateLimiter:
    """One token bucket per API key: `rate` requests a second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def wait(self, key_id: str, now: float) -> float:
        """0.0 if the request may proceed, else the seconds until it may."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(self._rate, self._burst, now)
        return bucket.try_take(now)

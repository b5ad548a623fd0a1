"""Token-bucket arithmetic with `now` passed in: per-endpoint delivery rates, per-key API rates."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`. Starts full."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: one is), taking none."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def spend(self, now: float) -> None:
        """Take a token whether or not there is one: a debt delays the next `wait`."""
        self._refill(now)
        self._tokens -= 1.0

    def empty(self, now: float) -> None:
        """Take every token there is: the next comes in 1/rate seconds."""
        self._refill(now)
        self._tokens = min(self._tokens, 0.0)

    def try_take(self, now: float) -> float:
        """Take a token and return 0.0, or return the seconds until one will be available."""
        wait = self.wait(now)
        if wait == 0.0:
            self._tokens -= 1.0
        return wait

"""The worker's Prometheus metrics. Labels are small fixed sets: never a URL, account or id.

deploy/ (alerts, dashboard) relies on these exact names; its tests scrape a running worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.metrics_core import Metric

from engine import __version__

__all__ = ["Children", "Metrics"]

M = TypeVar("M", Counter, Gauge, Histogram)

# The `_created` series of `deliveries_total` would be named `deliveries_created`, the same as
# the `deliveries_created_total` counter's family. Dashboards use no `_created` series, so they
# are switched off, and `deliveries_total` is registered past the registry's name-clash check.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _Unchecked:
    """A collector without `describe`, which the registry then registers without a name check."""

    def __init__(self, inner: Counter) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        return self._inner.collect()


class Children(Generic[M]):
    """A labelled metric's children, each looked up once: `labels()` validates and locks on
    every call, a few per cent of the worker's CPU when made per attempt. Label values are
    small fixed sets, so the cache stays small."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        try:
            return self._children[values]
        except KeyError:
            child: M = self._metric.labels(*values)
            self._children[values] = child
            return child


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Every worker metric, registered in one registry (a fresh one per worker in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        p = "cargolint_webhooks_"
        Info(p + "build", "Version of the running engine.", registry=r).info(
            {"version": __version__}
        )
        # outcome: accepted | dead_lettered
        self.events_consumed = Counter(
            p + "events_consumed_total",
            "Messages consumed from the events queue.",
            ["outcome"],
            registry=r,
        )
        # reason: invalid_json | too_large | unknown_event_type | schema_invalid | store_rejected
        self.events_dead_lettered = Counter(
            p + "events_dead_lettered_total",
            "Messages dead-lettered, by reason.",
            ["reason"],
            registry=r,
        )
        self.deliveries_created = Counter(
            p + "deliveries_created_total",
            "Deliveries created from events.",
            ["event_type"],
            registry=r,
        )
        # outcome: succeeded | failed (final states only)
        self.deliveries = Counter(
            p + "deliveries_total",
            "Deliveries that reached a final state.",
            ["event_type", "outcome"],
            registry=None,
        )
        r.register(_Unchecked(self.deliveries))
        # outcome: success | http_status | redirect | timeout | connection | tls | blocked_address
        # | internal (an attempt that failed inside the worker: a bug, logged with its traceback)
        self.attempts = Counter(
            p + "delivery_attempts_total",
            "HTTP delivery attempts, by outcome.",
            ["event_type", "outcome"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            p + "delivery_attempt_duration_seconds",
            "Time from request start to response end.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            p + "deliveries_in_flight", "HTTP attempts under way now.", registry=r
        )
        self.queued = Gauge(
            p + "deliveries_queued",
            "Deliveries held in memory waiting for an endpoint's limits.",
            registry=r,
        )
        self.retries_scheduled = Counter(
            p + "retries_scheduled_total",
            "Failed attempts that scheduled a retry.",
            ["event_type"],
            registry=r,
        )
        self.retries_due = Gauge(
            p + "retries_due",
            "Pending deliveries whose next attempt is due now (from Postgres, every 30 s).",
            registry=r,
        )
        self.retries_pending = Gauge(
            p + "retries_pending",
            "Pending deliveries waiting for a later retry (from Postgres, every 30 s).",
            registry=r,
        )
        self.rate_limit_waits = Counter(
            p + "rate_limit_waits_total",
            "Times a delivery waited for its endpoint's limits, or its pacing while failing.",
            ["limit"],
            registry=r,  # limit: rate | concurrency | global | account | failing | lease
        )
        self.endpoints_failing = Gauge(
            p + "endpoints_failing",
            "Endpoints whose last 5 or more attempts all failed (paced while a worker is behind).",
            registry=r,
        )
        self.deliveries_parked = Counter(
            p + "deliveries_parked_total",
            "Deliveries a failing endpoint had no room for, put back in Postgres until later.",
            registry=r,
        )
        self.cache_webhooks = Gauge(
            p + "cache_webhooks", "Active webhooks in the subscription cache.", registry=r
        )
        self.cache_reload_duration = Histogram(
            p + "cache_reload_duration_seconds",
            "Time a full subscription cache reload took.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.cache_last_reload = Gauge(
            p + "cache_last_reload_timestamp_seconds",
            "Unix time of the last successful full cache reload.",
            registry=r,
        )
        self.cache_reload_failures = Counter(
            p + "cache_reload_failures_total", "Full cache reloads that failed.", registry=r
        )
        self.event_lag = Histogram(
            p + "event_to_first_attempt_seconds",
            "Time from an event's receipt by the worker to its first delivery attempt.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.consumer_up = Gauge(
            p + "consumer_up",
            "1 while this worker is connected and consuming, else 0.",
            registry=r,
        )
        # table: deliveries | delivery_attempts | events
        self.retention_removed = Counter(
            p + "retention_removed_total",
            "Rows the retention purge removed, by table.",
            ["table"],
            registry=r,
        )
        self.retention_oldest_kept = Gauge(
            p + "retention_oldest_kept_seconds",
            "Age of the oldest finished delivery kept, at this worker's last purge run.",
            registry=r,
        )
        # reason: failing (every attempt failed for CARGOLINT_DISABLE_AFTER) | gone (a 410)
        self.webhooks_disabled = Counter(
            p + "webhooks_disabled_total",
            "Webhooks this worker disabled, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ("failing", "gone"):  # exported at 0, so rate() sees the first one
            self.webhooks_disabled.labels(reason)
        # The labelled ones, children cached: `metrics.attempts_by(event_type, outcome).inc()`.
        self.events_consumed_by = Children(self.events_consumed)
        self.events_dead_lettered_by = Children(self.events_dead_lettered)
        self.deliveries_created_by = Children(self.deliveries_created)
        self.deliveries_by = Children(self.deliveries)
        self.attempts_by = Children(self.attempts)
        self.retries_scheduled_by = Children(self.retries_scheduled)
        self.rate_limit_waits_by = Children(self.rate_limit_waits)
        self.retention_removed_by = Children(self.retention_removed)
        for table in ("deliveries", "delivery_attempts", "events"):
            self.retention_removed_by(table)
        self.webhooks_disabled_by = Children(self.webhooks_disabled)

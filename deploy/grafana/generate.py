"""Generate the CargoLint Webhooks Grafana dashboard from code, so it stays reviewable.

`python deploy/grafana/generate.py` rewrites cargolint-webhooks.json beside this file; `--check`
exits 1 if the committed JSON is out of date (tests/deploy runs the same comparison).
Every query filters on the `namespace` variable, which Prometheus Operator's PodMonitor and
ServiceMonitor attach to every series; elsewhere its "All" value (.*) matches series without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parent / "cargolint-webhooks.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace"'
P = "cargolint_webhooks_"

Panel = dict[str, Any]


def q(expr: str, legend: str = "") -> dict[str, str]:
    """A query; `{SEL}` in `expr` is the namespace selector, `{P}` the metric prefix."""
    return {"expr": expr.replace("{P}", P).replace("SEL", SEL), "legendFormat": legend}


def quantiles(metric: str, by: str = "") -> list[dict[str, str]]:
    """p50, p95 and p99 of a histogram."""
    group = f"le, {by}" if by else "le"
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) "
            f"(rate({{P}}{metric}_bucket{{SEL}}[$__rate_interval])))",
            f"p{round(p * 100)}",
        )
        for p in (0.5, 0.95, 0.99)
    ]


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, str]],
    *,
    w: int,
    h: int,
    stack: bool = False,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit}
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 0,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "showPoints": "never",
        }
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [
            {"datasource": DATASOURCE, "refId": chr(ord("A") + i), **t}
            for i, t in enumerate(targets)
        ],
        "gridPos": {"w": w, "h": h},
    }


def ts(title: str, description: str, unit: str, *targets: dict[str, str], **kw: Any) -> Panel:
    return panel("timeseries", title, description, unit, list(targets), w=12, h=8, **kw)


def stat(title: str, description: str, unit: str, *targets: dict[str, str]) -> Panel:
    return panel("stat", title, description, unit, list(targets), w=4, h=4)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Overview",
        [
            stat(
                "Workers consuming",
                "Workers connected to RabbitMQ and consuming the events queue.",
                "none",
                q("sum({P}consumer_up{SEL})"),
            ),
            stat(
                "Events in",
                "Messages consumed from cargolint.webhooks.events per second.",
                "ops",
                q("sum(rate({P}events_consumed_total{SEL}[$__rate_interval]))"),
            ),
            stat(
                "Attempt failure ratio",
                "Share of HTTP delivery attempts that did not get a 2xx.",
                "percentunit",
                q(
                    'sum(rate({P}delivery_attempts_total{outcome!="success",SEL}'
                    "[$__rate_interval])) / sum(rate({P}delivery_attempts_total{SEL}"
                    "[$__rate_interval]))"
                ),
            ),
            stat(
                "Retries due",
                "Pending deliveries whose next attempt is due now (from Postgres).",
                "short",
                q("max({P}retries_due{SEL})"),
            ),
            stat(
                "Oldest cache reload",
                "Time since the least recent successful subscription-cache reload.",
                "s",
                q("max(time() - {P}cache_last_reload_timestamp_seconds{SEL})"),
            ),
            stat(
                "Versions running",
                "Worker processes per engine version.",
                "none",
                q("count by (version) ({P}build_info{SEL})", "{{version}}"),
            ),
        ],
    ),
    (
        "Events and deliveries",
        [
            ts(
                "Events in by outcome",
                "Messages consumed: accepted, or dead-lettered.",
                "ops",
                q(
                    "sum by (outcome) (rate({P}events_consumed_total{SEL}[$__rate_interval]))",
                    "{{outcome}}",
                ),
                stack=True,
            ),
            ts(
                "Deliveries created by event type",
                "Deliveries created from accepted events (one per matching webhook).",
                "ops",
                q(
                    "sum by (event_type) "
                    "(rate({P}deliveries_created_total{SEL}[$__rate_interval]))",
                    "{{event_type}}",
                ),
                stack=True,
            ),
            ts(
                "Deliveries out by outcome",
                "Deliveries that reached a final state: succeeded, or failed after all retries.",
                "ops",
                q(
                    "sum by (outcome) (rate({P}deliveries_total{SEL}[$__rate_interval]))",
                    "{{outcome}}",
                ),
                stack=True,
            ),
            ts(
                "Attempts by outcome",
                "HTTP attempts: success, http_status, redirect, timeout, connection, tls, "
                "blocked_address, internal.",
                "ops",
                q(
                    "sum by (outcome) (rate({P}delivery_attempts_total{SEL}[$__rate_interval]))",
                    "{{outcome}}",
                ),
                stack=True,
            ),
            ts(
                "Top failing event types",
                "The five event types with the most failed attempts.",
                "ops",
                q(
                    "topk(5, sum by (event_type) (rate("
                    '{P}delivery_attempts_total{outcome!="success",SEL}[$__rate_interval])))',
                    "{{event_type}}",
                ),
            ),
            ts(
                "Dead letters by reason",
                "Messages sent to cargolint.webhooks.dead, by reason.",
                "ops",
                q(
                    "sum by (reason) (rate({P}events_dead_lettered_total{SEL}[$__rate_interval]))",
                    "{{reason}}",
                ),
                stack=True,
            ),
        ],
    ),
    (
        "Disabled, resent and recovered",
        [
            ts(
                "Webhooks disabled by reason",
                "Webhooks the workers disabled: gone (the receiver answered 410) or failing "
                "(every attempt failed for CARGOLINT_DISABLE_AFTER). Their owners re-enable "
                "them with PUT active: true, then recover what failed meanwhile.",
                "short",
                q(
                    "sum by (reason) (increase({P}webhooks_disabled_total{SEL}[$__rate_interval]))",
                    "{{reason}}",
                ),
                stack=True,
            ),
            ts(
                "Resend and recover calls",
                "API calls that send failed deliveries again: one delivery (retry) or every "
                "failed one of a webhook since a time (recover), by status.",
                "reqps",
                q(
                    "sum by (route, status) (rate({P}api_requests_total{"
                    'route=~".*/(retry|recover)",SEL}[$__rate_interval]))',
                    "{{route}} {{status}}",
                ),
                stack=True,
            ),
        ],
    ),
    (
        "Latency",
        [
            ts(
                "Attempt latency",
                "Time from request start to response end of delivery attempts.",
                "s",
                *quantiles("delivery_attempt_duration_seconds"),
            ),
            ts(
                "Event to first attempt",
                "Time from an event's receipt by a worker to its first delivery attempt.",
                "s",
                *quantiles("event_to_first_attempt_seconds"),
            ),
        ],
    ),
    (
        "Load and retries",
        [
            ts(
                "In flight and queued",
                "HTTP attempts under way, and deliveries held in memory for endpoint limits.",
                "short",
                q("sum({P}deliveries_in_flight{SEL})", "in flight"),
                q("sum({P}deliveries_queued{SEL})", "queued"),
            ),
            ts(
                "Failing endpoints and parked deliveries",
                "Endpoints whose last 5+ attempts all failed (paced while a worker is behind), "
                "and deliveries they had no room for, parked in Postgres until later.",
                "short",
                q("max({P}endpoints_failing{SEL})", "failing endpoints (busiest worker)"),
                q("sum(rate({P}deliveries_parked_total{SEL}[$__rate_interval]))", "parked/s"),
            ),
            ts(
                "Rate-limit waits by limit",
                "Times a delivery waited for its endpoint's rate or concurrency limit, or its "
                "pacing while failing.",
                "ops",
                q(
                    "sum by (limit) (rate({P}rate_limit_waits_total{SEL}[$__rate_interval]))",
                    "{{limit}}",
                ),
                stack=True,
            ),
            ts(
                "Retries scheduled by event type",
                "Failed attempts that scheduled a later retry.",
                "ops",
                q(
                    "sum by (event_type) (rate({P}retries_scheduled_total{SEL}[$__rate_interval]))",
                    "{{event_type}}",
                ),
                stack=True,
            ),
            ts(
                "Retry backlog",
                "Pending deliveries due now and waiting for later (global, from Postgres).",
                "short",
                q("max({P}retries_due{SEL})", "due"),
                q("max({P}retries_pending{SEL})", "pending"),
            ),
        ],
    ),
    (
        "Subscription cache",
        [
            ts(
                "Cached webhooks",
                "Active webhooks in the workers' caches; min and max should agree.",
                "short",
                q("max({P}cache_webhooks{SEL})", "max"),
                q("min({P}cache_webhooks{SEL})", "min"),
            ),
            ts(
                "Cache reload age",
                "Seconds since the last successful full reload, newest and oldest worker.",
                "s",
                q("max(time() - {P}cache_last_reload_timestamp_seconds{SEL})", "oldest"),
                q("min(time() - {P}cache_last_reload_timestamp_seconds{SEL})", "newest"),
            ),
            ts(
                "Cache reload duration",
                "Time a full subscription-cache reload took.",
                "s",
                *quantiles("cache_reload_duration_seconds"),
            ),
            ts(
                "Cache reload failures",
                "Full cache reloads that failed.",
                "ops",
                q("sum(rate({P}cache_reload_failures_total{SEL}[$__rate_interval]))", "failures"),
            ),
        ],
    ),
    (
        "Webhooks API",
        [
            ts(
                "API requests by status",
                "Requests answered by the management API, by status code.",
                "reqps",
                q(
                    "sum by (status) (rate({P}api_requests_total{SEL}[$__rate_interval]))",
                    "{{status}}",
                ),
                stack=True,
            ),
            ts(
                "API latency",
                "Time to answer an API request.",
                "s",
                *quantiles("api_request_duration_seconds"),
            ),
            ts(
                "API server errors",
                "Share of API requests answered with a 5xx status.",
                "percentunit",
                q(
                    'sum(rate({P}api_requests_total{status=~"5..",SEL}[$__rate_interval]))'
                    " / sum(rate({P}api_requests_total{SEL}[$__rate_interval]))",
                    "5xx",
                ),
            ),
            ts(
                "API requests by route",
                "Requests by method and route template.",
                "reqps",
                q(
                    "sum by (method, route) (rate({P}api_requests_total{SEL}[$__rate_interval]))",
                    "{{method}} {{route}}",
                ),
                stack=True,
            ),
        ],
    ),
]


def _layout(rows: list[tuple[str, list[Panel]]]) -> list[Panel]:
    """Rows one under another; each row's panels left to right, wrapping at 24 columns."""
    panels: list[Panel] = []
    y = 0
    for title, row_panels in rows:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        y += 1
        x = 0
        row_height = 0
        for p in row_panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y = 0, y + row_height
                row_height = 0
            panels.append({**p, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
            x += w
            row_height = max(row_height, h)
        y += row_height
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return panels


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    return {
        "uid": "cargolint-webhooks",
        "title": "CargoLint Webhooks",
        "description": "Events in, deliveries out, retries, dead letters, cache and API.",
        "tags": ["cargolint", "webhooks"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": f"label_values({P}build_info, namespace)",
                    "query": {
                        "query": f"label_values({P}build_info, namespace)",
                        "refId": "namespace",
                    },
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "sort": 1,
                    "regex": "",
                },
            ]
        },
        "annotations": {"list": []},
        "panels": _layout(ROWS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    rendered = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != rendered:
            sys.stderr.write(f"{TARGET} is out of date: run {Path(__file__).name}\n")
            return 1
        return 0
    TARGET.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

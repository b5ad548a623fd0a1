"""Just enough PromQL reading to check which metrics and labels alerts and dashboards use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from engine.api.metrics import ApiMetrics
from engine.worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "cargolint-webhooks.json"

METRIC = re.compile(r"\bcargolint_webhooks_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(cargolint_webhooks_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus itself attaches to every scraped series (Prometheus Operator adds
# namespace, pod, container, service, endpoint); our queries may filter on these.
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "container", "service"})
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_info")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = dashboard["templating"]["list"]
    exprs.extend(v["query"]["query"] for v in variables if v["type"] == "query")
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label
    }


def matcher_labels(expr: str) -> set[str]:
    return {label for _, body in SELECTOR.findall(expr) for label in MATCHER.findall(body)}


def catalogue_labels() -> dict[str, set[str]]:
    """Family name (as in the exposition's TYPE line) → every label the code can set on it."""
    labels: dict[str, set[str]] = {}
    for metrics in (Metrics(CollectorRegistry()), ApiMetrics(CollectorRegistry())):
        for collector in vars(metrics).values():
            if isinstance(collector, MetricWrapperBase):
                for family in collector.describe():
                    labels.setdefault(family.name, set()).update(collector._labelnames)
        for family in metrics.registry.collect():  # Info's labels live only in its samples
            for sample in family.samples:
                labels.setdefault(family.name, set()).update(sample.labels)
    return labels


def family_of(name: str, families: set[str]) -> str | None:
    if name in families:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return None

"""The table and the JSON summary: one key per figure, the targets, sanity checks."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios import Results, Sizes

__all__ = ["FIGURES", "TARGETS", "machine", "render_table", "summary", "targets"]

# key → (scenario, what, unit)
FIGURES: dict[str, tuple[str, str, str]] = {
    "limit_rps": ("limit", "plain aiohttp client → receiver", "req/s"),
    "throughput_rps": ("throughput", "deliveries through the worker", "dlv/s"),
    "throughput_ratio": ("throughput", "throughput / limit", "x"),
    "consume_cpu_us": ("consume", "aio-pika consuming alone, CPU per message", "µs"),
    "floor_ratio": ("consume", "limit client ÷ (it + consuming alone), CPU per item", "x"),
    "fanout_rps": ("fan-out", "deliveries, 10 webhooks per event", "dlv/s"),
    "isolation_ratio": ("isolation", "healthy dlv/s / throughput", "x"),
    "isolation_p50_ms": ("isolation", "healthy p50 at half load", "ms"),
    "isolation_p99_ms": ("isolation", "healthy p99 at half load", "ms"),
    "latency_p50_ms": ("latency", "p50 publish → receipt", "ms"),
    "latency_p99_ms": ("latency", "p99 publish → receipt", "ms"),
    "latency_p999_ms": ("latency", "p99.9 publish → receipt", "ms"),
    "cache_load_s": ("scale", "subscription cache load", "s"),
    "rss_mb": ("scale", "worker RSS with the cache", "MiB"),
    "rss_inflight_mb": ("scale", "worker RSS, deliveries held", "MiB"),
    "match_us": ("scale", "match cost per event", "µs"),
    "recover_s": ("recover", "POST recover of the failed deliveries", "s"),
    "recover_throughput_ratio": ("recover", "other traffic's dlv/s during ÷ before", "x"),
    "recover_p99_ms": ("recover", "other traffic's p99 during (before: extras)", "ms"),
    "retention_throughput_ratio": ("retention", "dlv/s with a purge / without", "x"),
    "retention_p99_ratio": ("retention", "paced p99 with a purge / without", "x"),
    "retention_rows_removed": ("retention", "old deliveries the purge removed", "rows"),
    "list_first_page_ms": ("history", "p99 first page, 10M deliveries", "ms"),
    "list_deep_page_ms": ("history", "p99 page at offset 5M", "ms"),
    "fleet_window_ratio": ("fleet", "worst 1 s at a limited endpoint ÷ allowed, 3 workers", "x"),
    "fleet_cpu_ratio": ("fleet", "worker CPU per delivery, 3 workers ÷ 1", "x"),
    "fairness_p99_ms": ("fairness", "p99 light tenant beside a 100,000 backlog", "ms"),
}


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    holds: Callable[[dict[str, float | None]], bool | None]


def _at_least(key: str, bound: float) -> Callable[[dict[str, float | None]], bool | None]:
    def holds(f: dict[str, float | None]) -> bool | None:
        value = f.get(key)
        return None if value is None else value >= bound

    return holds


def _under(key: str, bound: float) -> Callable[[dict[str, float | None]], bool | None]:
    def holds(f: dict[str, float | None]) -> bool | None:
        value = f.get(key)
        return None if value is None else value < bound

    return holds


def _isolation_p99(f: dict[str, float | None]) -> bool | None:
    iso, lat = f.get("isolation_p99_ms"), f.get("latency_p99_ms")
    return None if iso is None or lat is None else iso < 3 * lat


TARGETS = (
    Target("throughput_ratio", "≥ 0.60", _at_least("throughput_ratio", 0.60)),
    Target("isolation_ratio", "≥ 0.90", _at_least("isolation_ratio", 0.90)),
    Target("isolation_p99_ms", "< 3x latency_p99_ms", _isolation_p99),
    Target("latency_p99_ms", "< 50", _under("latency_p99_ms", 50.0)),
    Target("cache_load_s", "< 2", _under("cache_load_s", 2.0)),
    Target("rss_mb", "< 300", _under("rss_mb", 300.0)),
    Target("rss_inflight_mb", "< 300", _under("rss_inflight_mb", 300.0)),
    Target("recover_s", "< 5", _under("recover_s", 5.0)),
    Target("recover_throughput_ratio", "≥ 0.90", _at_least("recover_throughput_ratio", 0.90)),
)


def targets(figures: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each target: its bound, the value and pass (None when the figure is missing)."""
    return {
        t.key: {"target": t.text, "value": figures.get(t.key), "pass": t.holds(figures)}
        for t in TARGETS
    }


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(results: Results, quick: bool) -> str:
    """A Markdown table of every figure with its target, then any failed sanity check."""
    checks = targets(results.figures)
    lines = [
        f"CargoLint Webhooks benchmark ({'quick' if quick else 'full'}) — "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()['cpus']} CPUs",
        "",
        "| scenario | figure | value | unit | target | |",
        "|---|---|---:|---|---|---|",
    ]
    for key, (scenario, what, unit) in FIGURES.items():
        target = checks.get(key)
        verdict = ""
        if target is not None:
            verdict = {True: "pass", False: "FAIL", None: "n/a"}[target["pass"]]
        lines.append(
            f"| {scenario} | {what} (`{key}`) | {_fmt(results.figures.get(key))} | {unit} | "
            f"{target['target'] if target else ''} | {verdict} |"
        )
    failed = [c for c in results.sanity if not c["pass"]]
    lines.append("")
    lines.append(
        f"sanity: {len(results.sanity) - len(failed)} of {len(results.sanity)} checks hold"
    )
    lines.extend(f"  FAILED {c['check']}: {c['detail']}" for c in failed)
    lines.extend(f"  note: {n}" for n in results.notes)
    return "\n".join(lines)


def summary(results: Results, sizes: Sizes, quick: bool, seconds: float) -> dict[str, Any]:
    """The JSON summary: every figure key at top level (None if not measured), then the rest."""
    body: dict[str, Any] = {key: results.figures.get(key) for key in FIGURES}
    body["targets"] = targets(results.figures)
    body["sanity"] = results.sanity
    body["sanity_ok"] = all(c["pass"] for c in results.sanity) and bool(results.sanity)
    body["extra"] = results.extra
    body["notes"] = results.notes
    body["run"] = {
        "quick": quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "sizes": sizes.__dict__,
        "machine": machine(),
    }
    return body


def write_json(path: Path, body: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")

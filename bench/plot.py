"""`python -m bench.plot RUN.json OUT.png`: draw a run's rates and latencies beside its limit.

The left panel puts each rate scenario beside `limit` (the plain aiohttp client measured in the
same run, the machine's baseline); the right one the paced latencies against their target. The
README shows the picture of the run its performance table quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib as mpl
import orjson

mpl.use("Agg")  # files only: no display on servers and CI

from matplotlib import pyplot as plt

__all__ = ["draw"]

LATENCY_TARGET_MS = 50.0

_RATES = (
    ("limit_rps", "limit\n(plain aiohttp)"),
    ("throughput_rps", "throughput\n(1 endpoint)"),
    ("fanout_rps", "fan-out\n(10 endpoints)"),
)
_LATENCIES = (
    ("latency_p50_ms", "p50"),
    ("latency_p99_ms", "p99"),
    ("latency_p999_ms", "p99.9"),
    ("isolation_p99_ms", "isolation\np99"),
)


def _healthy_isolation_rps(run: dict[str, Any]) -> float | None:
    ratio, throughput = run.get("isolation_ratio"), run.get("throughput_rps")
    return None if ratio is None or throughput is None else ratio * throughput


def draw(run: dict[str, Any], out: Path) -> None:
    """Write the two-panel PNG of `run` (a `python -m bench --json` summary) to `out`."""
    rates = [(label, run.get(key)) for key, label in _RATES]
    rates.insert(2, ("isolation\n(16 healthy of 20)", _healthy_isolation_rps(run)))
    rates = [(label, value) for label, value in rates if value is not None]
    latencies = [(label, run.get(key)) for key, label in _LATENCIES]
    latencies = [(label, value) for label, value in latencies if value is not None]
    if not rates and not latencies:
        raise ValueError("the run has no rate or latency figure to draw")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(3, 2))
    if rates:
        labels, values = zip(*rates, strict=True)
        colours = ["#9e9e9e", *["#1f77b4"] * (len(values) - 1)]
        bars = left.bar(labels, values, color=colours)
        left.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        left.axhline(values[0], color="#616161", linestyle="--", linewidth=1)
        left.set_ylabel("deliveries (requests) per second")
        left.set_title("Rates beside the machine's limit", fontsize=10)
        left.tick_params(axis="x", labelsize=8)
    if latencies:
        labels, values = zip(*latencies, strict=True)
        bars = right.bar(labels, values, color="#ff7f0e")
        right.bar_label(bars, fmt="{:,.1f}", fontsize=8)
        right.axhline(LATENCY_TARGET_MS, color="#d62728", linestyle="--", linewidth=1)
        right.text(
            0, LATENCY_TARGET_MS, " latency p99 target", color="#d62728", fontsize=8, va="bottom"
        )
        right.set_ylabel("ms, publish → receipt")
        right.set_title("Latency at half of throughput's rate", fontsize=10)
        right.tick_params(axis="x", labelsize=8)
    date = run.get("run", {}).get("date", "")
    fig.suptitle(f"cargolint-webhooks bench, {date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Command line: `RUN.json OUT.png`."""
    if len(argv) != 2:
        print("usage: python -m bench.plot RUN.json OUT.png", file=sys.stderr)
        return 2
    run = orjson.loads(Path(argv[0]).read_bytes())
    draw(run, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The quick benchmark runs end to end and its summary holds every figure.

Loose sanity bounds only: no unit test times anything. The figures themselves are judged
against the targets by the full run, on a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import FIGURES, TARGETS

# Runs the quick benchmark end to end.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "limit_rps",
    "throughput_rps",
    "throughput_ratio",
    "consume_cpu_us",
    "floor_ratio",
    "fanout_rps",
    "isolation_ratio",
    "isolation_p50_ms",
    "isolation_p99_ms",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_p999_ms",
    "cache_load_s",
    "rss_mb",
    "rss_inflight_mb",
    "match_us",
    "recover_s",
    "recover_throughput_ratio",
    "recover_p99_ms",
)

Quick = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


@pytest.fixture(scope="module")
def quick(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), f"no summary written\n{done.stdout}\n{done.stderr}"
    return done, json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_quick_benchmark_passes_its_sanity_checks(quick: Quick) -> None:
    done, summary = quick
    failed = [c for c in summary["sanity"] if not c["pass"]]
    assert done.returncode == 0, f"{failed}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert summary["sanity_ok"] is True
    assert not failed
    assert summary["run"]["quick"] is True


@pytest.mark.timeout(300)
def test_summary_has_every_figure_and_target(quick: Quick) -> None:
    _, summary = quick
    assert set(KEYS) <= set(FIGURES)
    for key in KEYS:
        assert isinstance(summary[key], int | float), f"{key} = {summary[key]!r}"
        assert summary[key] > 0, key
    assert set(summary["targets"]) == {t.key for t in TARGETS}
    for name, target in summary["targets"].items():
        assert target["pass"] in (True, False), name
        assert target["value"] == summary[name]


@pytest.mark.timeout(300)
def test_loose_bounds(quick: Quick) -> None:
    _, s = quick
    assert 0 < s["throughput_ratio"] < 5
    # The floor is a share of one client's cost: between 0 and 1, and no worker beats it by far.
    assert 0 < s["floor_ratio"] < 1
    assert s["extra"]["consume_rps_by_round"]
    assert 0 < s["isolation_ratio"] < 5
    assert s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_p999_ms"]
    assert s["isolation_p50_ms"] <= s["isolation_p99_ms"]
    assert s["rss_mb"] < 2048
    assert s["rss_inflight_mb"] < 2048
    assert s["cache_load_s"] < 60
    assert 0 < s["recover_s"] < 60
    assert 0 < s["recover_throughput_ratio"] < 5
    # Hung endpoints were really tried, yet every healthy delivery still arrived.
    assert (
        s["extra"]["isolation_paced_hang_arrivals"] + s["extra"]["isolation_paced_fail_arrivals"]
        > 0
    )

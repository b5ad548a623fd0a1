"""The benchmark's picture: drawn from a run's JSON summary, refused with nothing to draw."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.plot import draw

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_run_is_drawn_as_a_png(tmp_path: Path) -> None:
    run = {
        "limit_rps": 3106.0,
        "throughput_rps": 3052.0,
        "isolation_ratio": 0.929,
        "latency_p50_ms": 12.7,
        "latency_p99_ms": 29.9,
        "run": {"date": "2026-11-28T16:34:00+00:00"},
    }
    out = tmp_path / "run.png"
    draw(run, out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert out.stat().st_size > 10_000


def test_a_run_without_figures_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rate or latency"):
        draw({"run": {}}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()

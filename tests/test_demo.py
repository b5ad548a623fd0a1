"""The Quickstart's main job, `cargolint-webhooks demo`, end to end as a user runs it.

On its own database and RabbitMQ vhost, so it neither reads nor leaves anything the other tests
see; both are removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.ids import random_token
from tests.conftest import drop_database, fresh_vhost

# Runs the whole demo end to end.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


async def test_the_demo_delivers_every_event_and_verifies_each_signature() -> None:
    name = f"cargolint_demo_{random_token(10)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOLINT_")}
    env["CARGOLINT_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with fresh_vhost(name) as amqp_url:
            env["CARGOLINT_AMQP_URL"] = amqp_url
            result = subprocess.run(
                [sys.executable, "-m", "engine", "demo"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
    finally:
        await drop_database(name)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "demo finished: every delivery verified" in out
    # One test delivery through the API, then one event of each type, each signed and recorded.
    assert "/test → succeeded (HTTP 200, signature verified)" in out
    for event_type in ("document.uploaded", "compliance.warning", "document.batch_downloaded"):
        assert f"received {event_type}" in out
    assert out.count(" signature verified") >= 4
    assert out.count(" succeeded attempts=1 HTTP 200") == 4

"""Every metric the alerts and the dashboard use is exported by a real worker or API process.

Both run as `cargolint-webhooks worker|api` subprocesses against the test run's database and
RabbitMQ vhost; their /metrics pages are scraped, compared and linted with `promtool check metrics`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import tool
from tests.deploy.promql import alert_rules, dashboard_exprs, metric_names

# Starts a worker and an API process and runs promtool.
pytestmark = pytest.mark.slow

CLI = Path(sys.executable).parent / "cargolint-webhooks"
START_TIMEOUT = 60.0
# Sample names a family of each type exposes (prometheus_client also adds `_created`).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def _serve(
    command: str, env: dict[str, str], ready_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cargolint-webhooks COMMAND` until `ready_url` answers 200; stop it with SIGTERM."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CLI), command], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command} exited with {process.returncode}:\n{log.read_text()}")
            try:
                if _get(ready_url)[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"{command} not ready after {START_TIMEOUT}s:\n{log.read_text()}")
            time.sleep(0.2)  # a separate process: nothing to await but its port
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def env(database_url: str, amqp_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CARGOLINT_DATABASE_URL": database_url,
        "CARGOLINT_AMQP_URL": amqp_url,
        "CARGOLINT_API_HOST": "127.0.0.1",
        "CARGOLINT_API_PORT": str(_free_port()),
        "CARGOLINT_METRICS_PORT": str(_free_port()),
        "CARGOLINT_SHUTDOWN_GRACE": "2",
    }


@pytest.fixture(scope="module")
def worker_exposition(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    base = f"http://127.0.0.1:{env['CARGOLINT_METRICS_PORT']}"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with _serve("worker", env, f"{base}/readyz", log):
        status, body = _get(f"{base}/metrics")
    assert status == 200
    return body


@pytest.fixture(scope="module")
def api_exposition(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    base = f"http://127.0.0.1:{env['CARGOLINT_API_PORT']}"
    log = tmp_path_factory.mktemp("api") / "api.log"
    with _serve("api", env, f"{base}/healthz", log):
        # One real API request, so the labelled request metrics have a sample to show.
        assert _get(f"{base}/api/v1/webhooks")[0] == 401
        status, body = _get(f"{base}/metrics")
    assert status == 200
    return body


def exported_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_worker_exports_its_catalogue(worker_exposition: str) -> None:
    names = exported_names(worker_exposition)
    assert "cargolint_webhooks_consumer_up" in names
    assert "cargolint_webhooks_event_to_first_attempt_seconds_bucket" in names


def test_the_api_exports_request_metrics_with_their_labels(api_exposition: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(api_exposition)}
    requests = families["cargolint_webhooks_api_requests"]
    assert requests.type == "counter"
    labels = {k for s in requests.samples if s.name.endswith("_total") for k in s.labels}
    assert labels == {"method", "route", "status"}
    assert "cargolint_webhooks_api_request_duration_seconds" in families


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_used_is_exported(
    source: str, worker_exposition: str, api_exposition: str
) -> None:
    exprs = [r["expr"] for r in alert_rules()] if source == "alerts" else dashboard_exprs()
    used = {name for expr in exprs for name in metric_names(expr)}
    assert used
    missing = used - exported_names(worker_exposition) - exported_names(api_exposition)
    assert not missing, f"{source} use metrics no process exports: {sorted(missing)}"


@pytest.mark.parametrize("process", ["worker", "api"])
def test_promtool_accepts_the_exposition(
    process: str, worker_exposition: str, api_exposition: str
) -> None:
    exposition = worker_exposition if process == "worker" else api_exposition
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

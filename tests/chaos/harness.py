"""Run the real engine as subprocesses, publish events, and wait for their effects.

Shared by the chaos scenarios and the security suite's log-capture test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import aio_pika
import aiohttp
import orjson

__all__ = [
    "PYTHON",
    "Proc",
    "engine_env",
    "free_port",
    "make_event",
    "publish",
    "run_cli",
    "wait_until",
]

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_env(
    *, database_url: str, amqp_url: str, ca_file: Path | None = None, **extra: str
) -> dict[str, str]:
    """The environment of an engine process: ours minus any CARGOLINT_*, plus the given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOLINT_")}
    env.update(
        CARGOLINT_DATABASE_URL=database_url,
        CARGOLINT_AMQP_URL=amqp_url,
        CARGOLINT_ALLOWED_NETWORKS="127.0.0.0/8",
        CARGOLINT_METRICS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    if ca_file is not None:
        env["CARGOLINT_CA_BUNDLE"] = str(ca_file)
    env.update({f"CARGOLINT_{k.upper()}": v for k, v in extra.items()})
    return env


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run a one-shot command (`migrate`, `accounts create`, ...) and return its JSON output."""
    result = subprocess.run(
        [PYTHON, "-m", "engine", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr[-2000:]}")
    parsed: dict[str, Any] = orjson.loads(result.stdout)
    return parsed


class Proc:
    """A long-running engine subprocess (`worker`, `api`) with its output in files."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.stdout_path = logdir / f"{name}.stdout"
        self.stderr_path = logdir / f"{name}.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def start(self) -> Proc:
        out = self.stdout_path.open("ab")
        err = self.stderr_path.open("ab")
        self._files = [out, err]
        self.process = subprocess.Popen(
            [PYTHON, "-m", "engine", *self.args],
            env=self.env,
            stdout=out,
            stderr=err,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Wait until `url` answers 200, failing early if the process exits."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if not self.alive():
                    raise AssertionError(f"{self.name} exited early:\n{self.output()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: {url} not ready:\n{self.output()[-3000:]}")
                await asyncio.sleep(0.1)

    async def ready(self, timeout: float = 30.0) -> None:
        """For a worker: wait for /readyz on its metrics port."""
        port = self.env["CARGOLINT_METRICS_PORT"]
        await self.wait_http(f"http://127.0.0.1:{port}/readyz", timeout)

    async def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            self.kill()
        code = self.process.wait()
        self._close_files()
        return code

    def kill(self) -> None:
        """kill -9: no goodbyes, no final writes."""
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait()
        self._close_files()

    def rss_kb(self) -> int:
        """Resident memory of the process now, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def output(self) -> str:
        paths = (self.stdout_path, self.stderr_path)
        return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


def make_event(
    number: int, account_id: str, *, run: str, event_type: str = "document.uploaded"
) -> dict[str, Any]:
    """A valid `document.uploaded` event (docs/contract.md §2) with a unique id."""
    return {
        "id": f"evt_{run}_{number}",
        "event": event_type,
        "accountId": account_id,
        "mode": "test",
        "timestamp": "2026-03-02T11:45:00Z",
        "data": {
            "document": {
                "id": f"doc_{number}",
                "fileName": f"invoice-{number}.pdf",
                "documentType": "invoice",
                "status": "processing",
            }
        },
    }


async def publish(amqp_url: str, events: Iterable[dict[str, Any]], *, batch: int = 250) -> int:
    """Publish persistent events with publisher confirms; return how many the broker took."""
    connection = await aio_pika.connect(amqp_url)
    count = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            "cargolint.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        pending: list[Awaitable[Any]] = []
        for event in events:
            message = aio_pika.Message(
                orjson.dumps(event),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event["id"],
            )
            pending.append(exchange.publish(message, routing_key=event["event"]))
            if len(pending) >= batch:
                await asyncio.gather(*pending)
                count += len(pending)
                pending = []
        await asyncio.gather(*pending)
        count += len(pending)
    finally:
        await connection.close()
    return count


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.2, what: str = ""
) -> float:
    """Poll `check` until true; return the seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or check}")
        await asyncio.sleep(interval)
    return time.monotonic() - started

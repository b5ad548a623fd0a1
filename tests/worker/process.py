"""The real `cargolint-webhooks worker` as a subprocess, with its JSON logs collected."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.settings import Settings


def worker_env(settings: Settings, ca_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOLINT_")}
    env.update(
        CARGOLINT_DATABASE_URL=settings.database_url,
        CARGOLINT_AMQP_URL=settings.amqp_url,
        CARGOLINT_METRICS_PORT="0",
        CARGOLINT_ALLOWED_NETWORKS="127.0.0.0/8",
        CARGOLINT_CA_BUNDLE=str(ca_file),
        CARGOLINT_DELIVERY_TIMEOUT=str(settings.delivery_timeout),
        CARGOLINT_RETRY_SCHEDULE="200ms,400ms",
        CARGOLINT_POLL_INTERVAL="0.05",
        CARGOLINT_WORKER_LEASE="2",
        CARGOLINT_SHUTDOWN_GRACE="3",
        CARGOLINT_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """Start, signal and wait for one worker process; `logs` holds its parsed log lines."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def worker_id(self) -> str:
        return next(str(e["worker_id"]) for e in self.logs if e.get("msg") == "worker started")

    @property
    def metrics_port(self) -> int:
        return next(int(e["port"]) for e in self.logs if "port" in e)

    async def start(self, timeout: float = 20.0) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            "worker",
            env=self._env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        started = asyncio.create_task(self._started.wait())
        ended = asyncio.create_task(self.proc.wait())
        await asyncio.wait({started, ended}, timeout=timeout, return_when="FIRST_COMPLETED")
        started.cancel()
        ended.cancel()
        if not self._started.is_set():
            await self.kill()
            raise AssertionError(f"worker did not start: {self.logs[-5:]}")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"msg": line.decode(errors="replace").rstrip()}
            self.logs.append(entry)
            if entry.get("msg") == "worker started":
                self._started.set()

    async def kill(self) -> None:
        """`kill -9`: no chance to clean up."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

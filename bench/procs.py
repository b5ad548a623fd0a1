"""The processes the benchmark drives: the receiver, the engine's worker, the limit client.

Each is started with bounded waits and always stopped: SIGTERM first, SIGKILL after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

__all__ = [
    "CpuMeter",
    "LimitClient",
    "ReceiverProcess",
    "WorkerProcess",
    "cpu_seconds",
    "free_port",
    "machine_busy_seconds",
    "parse_metrics",
    "pids_named",
    "py_spy",
    "receiver_process",
    "run_module",
    "worker_process",
]

READY_TIMEOUT = 60.0
STOP_GRACE = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _stop(process: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> int | None:
    """SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit code (None if unknown)."""
    if process.returncode is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


class ReceiverProcess:
    """The `bench.receiver` subprocess and its line-based control channel."""

    def __init__(self, process: asyncio.subprocess.Process, ports: dict[str, list[int]]) -> None:
        self.process = process
        self.ports = ports
        self._lock = asyncio.Lock()

    def url(self, kind: str, index: int = 0) -> str:
        return f"https://127.0.0.1:{self.ports[kind][index]}/hook"

    async def call(self, cmd: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        async with self._lock:
            self.process.stdin.write(orjson.dumps({"cmd": cmd}) + b"\n")
            await self.process.stdin.drain()
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the receiver process exited")
        answer: dict[str, Any] = orjson.loads(line)
        return answer

    async def reset(self) -> None:
        await self.call("reset")

    async def count(self) -> dict[str, Any]:
        return await self.call("count")

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

    async def wait_ok(self, expected: int, within: float) -> dict[str, Any]:
        """Poll until `expected` distinct deliveries reached ok endpoints, or `within` s pass."""
        deadline = time.monotonic() + within
        counted = await self.count()
        while counted["okUnique"] < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            counted = await self.count()
        return counted


@contextlib.asynccontextmanager
async def receiver_process(
    cert: Path, key: Path, secret: str, *, ok: int, fail: int, hang: int
) -> AsyncIterator[ReceiverProcess]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.receiver",
        f"--cert={cert}",
        f"--key={key}",
        f"--secret={secret}",
        f"--ok={ok}",
        f"--fail={fail}",
        f"--hang={hang}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
        if not line:
            raise RuntimeError("the receiver process exited before listening")
        yield ReceiverProcess(process, orjson.loads(line)["ports"])
    finally:
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.write(b'{"cmd": "quit"}\n')
                process.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 3)
        await _stop(process)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → {'name{labels}': value}; comments skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def pids_named(*names: str) -> list[int]:
    """Processes whose command name (/proc/<pid>/comm) is one of `names`."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over every CPU, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _clock_ticks()


class CpuMeter:
    """CPU seconds used by groups of processes (and the whole machine) between two readings.

    A group is a function returning its pids now, so processes that start meanwhile (Postgres
    backends) count from zero; ones that exit meanwhile are lost. Postgres and RabbitMQ are
    shared with whatever else runs on the machine, so their share is noisy.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start = {name: self._per_pid(pids()) for name, pids in groups.items()}
        self._machine = machine_busy_seconds()

    @staticmethod
    def _per_pid(pids: list[int]) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for pid in pids}

    def used(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for name, pids in self.groups.items():
            before = self._start[name]
            now = self._per_pid(pids())
            result[name] = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in now.items())
        result["machine"] = machine_busy_seconds() - self._machine
        return result


class WorkerProcess:
    """A running `python -m engine worker` and what can be read about it from outside."""

    def __init__(self, process: asyncio.subprocess.Process, metrics_port: int, log: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.metrics_port = metrics_port
        self.log = log

    async def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(url) as response,
        ):
            return response.status, await response.text()

    async def wait_ready(self, within: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"the worker exited with {self.process.returncode} before it was ready; "
                    f"see {self.log}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                status, _ = await self.get("/readyz")
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the worker was not ready within {within:g}s; see {self.log}")

    async def metrics(self) -> dict[str, float]:
        _, text = await self.get("/metrics")
        return parse_metrics(text)

    def rss_mb(self) -> float:
        """Resident set size from /proc/<pid>/status (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, from /proc/<pid>/stat."""
        return cpu_seconds(self.pid)

    async def stop(self) -> int | None:
        return await _stop(self.process)


@contextlib.asynccontextmanager
async def py_spy(pid: int, output: Path) -> AsyncIterator[None]:
    """Sample `pid` with py-spy into `output` (collapsed stacks; .svg for a flame graph)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    kind = "flamegraph" if output.suffix == ".svg" else "raw"
    process = await asyncio.create_subprocess_exec(
        exe,
        "record",
        f"--pid={pid}",
        f"--output={output}",
        f"--format={kind}",
        "--rate=200",
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        # SIGINT makes py-spy write what it sampled and exit.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 20)
        await _stop(process, 1)


@contextlib.asynccontextmanager
async def worker_process(
    env: dict[str, str], log: Path, *, ready: bool = True, profile: Path | None = None
) -> AsyncIterator[WorkerProcess]:
    """Start `python -m engine worker` with `env` added to ours; stop it at the end.

    With `profile`, py-spy samples the worker from start to stop into that file.
    """
    metrics_port = free_port()
    full_env = {**os.environ, **env, "CARGOLINT_METRICS_PORT": str(metrics_port)}
    handle: IO[bytes] = log.open("ab")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            "worker",
            env=full_env,
            stdout=handle,
            stderr=handle,
        )
        worker = WorkerProcess(process, metrics_port, log)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if profile is not None:
                    await stack.enter_async_context(py_spy(process.pid, profile))
                if ready:
                    await worker.wait_ready()
                yield worker
        finally:
            await worker.stop()
    finally:
        handle.close()


async def run_module(module: str, *args: str, within: float = 600) -> dict[str, Any]:
    """Run `python -m <module> ARGS` (a measuring client in its own process, such as
    `bench.limit` or `bench.consume`) and return the JSON line it printed last."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within)
    finally:
        await _stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"{module} exited with {process.returncode}")
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


class LimitClient:
    """Runs `python -m bench.limit` once and returns its JSON result."""

    @staticmethod
    async def run(url: str, ca: Path, concurrency: int, count: int, warmup: int) -> dict[str, Any]:
        return await run_module(
            "bench.limit",
            f"--url={url}",
            f"--ca={ca}",
            f"--concurrency={concurrency}",
            f"--count={count}",
            f"--warmup={warmup}",
        )

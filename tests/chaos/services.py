"""Throwaway RabbitMQ and PostgreSQL servers on their own ports, and a TCP proxy that cuts.

Nothing here touches the machine's shared servers (5672, 5432): each throwaway server has its
own data directory under /tmp, its own ports and, for RabbitMQ, its own node name. They run as
the `rabbitmq` and `postgres` users (neither refuses to run as root by accident), keep their
data across restarts, and are stopped and deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from engine.core.ids import random_token
from tests.chaos.harness import free_port

__all__ = ["TcpProxy", "ThrowawayPostgres", "ThrowawayRabbit", "wait_port"]


def wait_port(port: int, timeout: float, *, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"server exited with {alive.returncode} before opening {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")
        time.sleep(0.1)


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _owned_tempdir(user: str, prefix: str) -> Path:
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, so the server's user could not enter.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (children first found, then theirs)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _as(user: str) -> list[str]:
    return [] if pwd.getpwuid(os.getuid()).pw_name == user else ["runuser", "-u", user, "--"]


# ---------------------------------------------------------------- PostgreSQL


class ThrowawayPostgres:
    """`initdb` into a temp dir, `pg_ctl` start/stop/restart on a free port, trust auth."""

    USER = "postgres"

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = found[-1].parent
        self.port = free_port()
        self.dir = _owned_tempdir(self.USER, "cargolint-chaos-pg-")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.start_seconds: list[float] = []

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*_as(self.USER), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            cwd=self.dir,
        )

    def init(self) -> ThrowawayPostgres:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self) -> float:
        """Start and wait until it accepts connections; return the seconds it took."""
        started = time.monotonic()
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=100 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        wait_port(self.port, 30)
        took = time.monotonic() - started
        self.start_seconds.append(took)
        return took

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects clients and shuts down cleanly; `immediate` is like a crash."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> float:
        self.stop(mode)
        return self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def cleanup(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- RabbitMQ


class ThrowawayRabbit:
    """A second RabbitMQ node, `chaos_<random>@localhost`, with its own ports and mnesia dir.

    Runs in the foreground under our control (no -detached), as the `rabbitmq` user so it
    shares the Erlang cookie that `rabbitmqctl` uses. The mnesia dir is kept across restarts,
    so durable queues and persistent messages survive them.
    """

    USER = "rabbitmq"
    HOME = "/var/lib/rabbitmq"  # where the Erlang cookie lives
    BIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self) -> None:
        self.node = f"chaos_{random_token(8)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = _owned_tempdir(self.USER, "cargolint-chaos-mq-")
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not the machine's, which names a node
        for path in self.dir.iterdir():
            os.chown(path, pwd.getpwnam(self.USER).pw_uid, pwd.getpwnam(self.USER).pw_gid)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=self.HOME,
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbit.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*_as(self.USER), str(self.BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=self.dir,
        )

    def start(self, timeout: float = 90) -> float:
        """Start the node and wait for its AMQP port; return the seconds it took."""
        started = time.monotonic()
        log = (self.dir / "server.out").open("ab")
        self.process = subprocess.Popen(
            [*_as(self.USER), str(self.BIN / "rabbitmq-server")],
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        log.close()
        try:
            wait_port(self.port, timeout, alive=self.process)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{self.server_output()[-3000:]}") from exc
        took = time.monotonic() - started
        self.start_seconds.append(took)
        return took

    def server_output(self) -> str:
        path = self.dir / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 60) -> None:
        """Stop the node cleanly (`rabbitmqctl stop`) and wait for its process to end."""
        if self.process is None:
            return
        result = self._ctl("stop", timeout=timeout)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if result.returncode != 0 and self.process.poll() is None:
            raise RuntimeError(f"rabbitmqctl stop failed: {result.stderr.decode()[-2000:]}")
        self.process = None

    def kill(self) -> None:
        """Like a crash: SIGKILL to runuser, the shell, beam and beam's helpers, by pid."""
        if self.process is not None:
            for pid in [self.process.pid, *_descendants(self.process.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
            deadline = time.monotonic() + 10
            while not port_closed(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> float:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
            self.stop(timeout=30)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- the proxy


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port` that tests can break on purpose.

    `cut()` aborts every open connection (a network drop, both ends see a reset); `block()`
    additionally refuses new ones until `restore()`; `freeze()` keeps connections open but
    stops moving bytes (a black hole), which only timeouts notice.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._blocked = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        # One side ended: end the other too, so neither hangs half-open.
        writer.transport.abort()

    def cut(self) -> int:
        """Abort every open connection; return how many sockets were cut."""
        cut = len(self._open)
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        return cut

    def block(self) -> None:
        self._blocked = True
        self.cut()

    def freeze(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._blocked = False
        self._flowing.set()

    async def close(self) -> None:
        self.restore()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

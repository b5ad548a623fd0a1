"""The release as the image builds it, since no Docker engine runs here.

The Docker build context is what `.dockerignore` admits; from a copy of exactly that, the wheel is
built and installed with the locked runtime dependencies into a fresh venv, as the Dockerfile
does, and `migrate`, `api` and `worker` start from that venv against the real services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from engine.core.ids import random_token
from tests.conftest import drop_database, fresh_vhost
from tests.deploy.conftest import ROOT

SCHEMAS = sorted(p.name for p in (ROOT / "engine" / "schemas").glob("*.json"))


def _pattern(text: str) -> re.Pattern[str]:
    """One .dockerignore pattern as Docker matches it: `*` and `?` stay within one path
    element, `**` spans any number of them, and a pattern that names a directory covers all
    that is under it."""
    body = os.path.normpath(text.strip().lstrip("/"))
    regex = ""
    i = 0
    while i < len(body):
        if body.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif body.startswith("**", i):
            regex += ".*"
            i += 2
        elif body[i] == "*":
            regex += "[^/]*"
            i += 1
        elif body[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(body[i])
            i += 1
    return re.compile(regex + "(?:/.*)?")


def dockerignore_rules(root: Path = ROOT) -> list[tuple[bool, re.Pattern[str]]]:
    """(admits, pattern) for each line of `.dockerignore`, in order: the last match decides."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            rules.append((text.startswith("!"), _pattern(text.removeprefix("!"))))
    return rules


def admitted(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    result = True
    for admits, pattern in rules:
        if pattern.fullmatch(path):
            result = admits
    return result


def build_context(root: Path = ROOT) -> list[str]:
    """The files of the working tree that `docker build` would send, as relative paths."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    rules = dockerignore_rules(root)
    return sorted(
        path
        for path in set(listed.split("\0"))
        if path and os.path.lexists(root / path) and admitted(path, rules)
    )


def copy_context(destination: Path) -> None:
    """Copy the build context to `destination`, symlinks as symlinks (as Docker sends them)."""
    for path in build_context():
        source, target = ROOT / path, destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)


def test_dockerignore_patterns_match_as_docker_matches_them() -> None:
    rules = [
        (False, _pattern("*")),
        (True, _pattern("engine/")),
        (False, _pattern("**/__pycache__")),
        (False, _pattern("**/*.pyc")),
    ]
    assert admitted("engine/api/app.py", rules)
    assert admitted("engine/schemas/openapi.json", rules)
    assert not admitted("engine/api/__pycache__/app.cpython-311.pyc", rules)
    assert not admitted("engine/stray.pyc", rules)
    assert not admitted("schemas/openapi.json", rules)
    assert not admitted("tests/conftest.py", rules)
    assert not admitted("engineering/notes.md", rules)
    assert admitted("a/b", [(False, _pattern("a?"))])
    assert not admitted("ab/c", [(False, _pattern("a?"))])


def test_the_build_context_holds_the_schemas_as_files() -> None:
    context = build_context()
    for name in ("pyproject.toml", "uv.lock", "README.md", "engine/cli.py"):
        assert name in context
    assert not [p for p in context if p.startswith(("tests/", "deploy/", ".venv/", ".git/"))]
    assert SCHEMAS
    for name in SCHEMAS:
        path = f"engine/schemas/{name}"
        assert path in context, f"the image would lack {path}"
        assert not (ROOT / path).is_symlink()
    assert not [p for p in context if (ROOT / p).is_symlink()], "a symlink may point outside"


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=_clean_env() if env is None else env,
    )
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the project's venv or settings leaking into the release's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CARGOLINT_", "UV_")) and k not in {"VIRTUAL_ENV", "PYTHONPATH"}
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from the build context and the locked runtime
    dependencies, the way the Dockerfile's build stage makes /opt/venv; returns its bin/."""
    work = tmp_path_factory.mktemp("release")
    context = work / "context"
    copy_context(context)
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    assert uv is not None, "uv is missing: ./dev installs it into the venv"
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=work)
    pip = venv / "bin" / "pip"
    requirements = work / "requirements.txt"
    _run(
        uv,
        "export",
        "--locked",
        "--no-dev",
        "--no-emit-project",
        "--format",
        "requirements-txt",
        "--output-file",
        requirements,
        cwd=context,
    )
    _run(pip, "install", "--quiet", "--require-hashes", "--no-deps", "-r", requirements, cwd=work)
    _run(pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", work / "dist", context, cwd=work)
    (wheel,) = (work / "dist").glob("cargolint_webhooks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SCHEMAS if f"engine/schemas/{n}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    _run(pip, "install", "--quiet", "--no-deps", wheel, cwd=work)
    _run(pip, "check", cwd=work)
    return venv / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _vhost() -> Iterator[str]:
    with fresh_vhost(f"cargolint_release_{random_token(10)}") as url:
        yield url


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[str]:
    name = f"cargolint_release_{random_token(10)}"
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        await drop_database(name)


async def _started(
    bin_dir: Path, command: str, env: dict[str, str], log: Path
) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            bin_dir / "cargolint-webhooks",
            command,
            cwd=log.parent,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def _answer(
    http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process, log: Path
) -> tuple[int, bytes]:
    """The first answer from `url` within 60 s, while `process` keeps running."""
    async with asyncio.timeout(60):
        while True:
            assert process.returncode is None, f"exited early:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(url) as response:
                    if response.status != 503:
                        return response.status, await response.read()
            await asyncio.sleep(0.2)


async def _stopped(process: asyncio.subprocess.Process, log: Path) -> None:
    """SIGTERM, then a clean exit within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(process.wait(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"did not stop on SIGTERM:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]


@pytest.mark.slow
async def test_the_release_migrates_and_serves_from_a_fresh_venv(
    release: Path, tmp_path: Path
) -> None:
    api_port, metrics_port = _free_port(), _free_port()
    with _vhost() as amqp_url:
        async with _database() as database_url, aiohttp.ClientSession() as http:
            env = _clean_env(
                CARGOLINT_DATABASE_URL=database_url,
                CARGOLINT_AMQP_URL=amqp_url,
                CARGOLINT_API_HOST="127.0.0.1",
                CARGOLINT_API_PORT=str(api_port),
                CARGOLINT_METRICS_PORT=str(metrics_port),
            )
            # The engine runs from the fresh venv, not from this checkout.
            where = _run(
                release / "python", "-c", "import engine; print(engine.__file__)", cwd=tmp_path
            )
            assert Path(where.strip()).is_relative_to(release.parent), where

            out = _run(release / "cargolint-webhooks", "migrate", cwd=tmp_path, env=env)
            assert orjson.loads(out)["applied"], "a new database gets every migration"

            api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
            api = await _started(release, "api", env, api_log)
            worker = await _started(release, "worker", env, worker_log)
            try:
                base = f"http://127.0.0.1:{api_port}"
                status, body = await _answer(http, f"{base}/healthz", api, api_log)
                assert (status, orjson.loads(body)) == (200, {"status": "ok"})
                status, body = await _answer(http, f"{base}/api/v1/openapi.json", api, api_log)
                assert status == 200
                served = orjson.loads(body)
                assert served == orjson.loads((ROOT / "schemas" / "openapi.json").read_bytes())
                status, _ = await _answer(http, f"{base}/api/v1/webhooks", api, api_log)
                assert status == 401, "the API answers from its database, not only its docs"

                health = f"http://127.0.0.1:{metrics_port}"
                status, _ = await _answer(http, f"{health}/healthz", worker, worker_log)
                assert status == 200
                status, body = await _answer(http, f"{health}/readyz", worker, worker_log)
                assert (status, orjson.loads(body)["status"]) == (200, "ready"), body
            finally:
                for process, log in ((api, api_log), (worker, worker_log)):
                    if process.returncode is None:
                        await _stopped(process, log)
            assert api.returncode == 0
            assert worker.returncode == 0


def test_the_dockerfile_installs_what_this_test_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^UV_VERSION=(\S+)$", (ROOT / "dev").read_text(), re.MULTILINE)
    assert found is not None
    assert f"uv=={found[1]}" in dockerfile, "the image and ./dev read uv.lock with one uv release"
    for step in (
        "COPY pyproject.toml uv.lock",
        "uv export --locked --no-dev --no-emit-project",
        "--require-hashes --no-deps",
        "pip wheel --no-cache-dir --no-deps",
    ):
        assert step in dockerfile, step

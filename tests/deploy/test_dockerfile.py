"""The Dockerfile cannot be built here (no Docker engine): lint it and check what matters."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


@pytest.mark.slow
def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "info", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_slim_python_311() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image


def test_runtime_stage_runs_the_console_script_as_non_root() -> None:
    final = dict(_stages()[-1])
    user = final["USER"].split(":")[0]
    assert user.isdigit(), "numeric, so Kubernetes can verify runAsNonRoot"
    assert int(user) != 0
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(final["ENTRYPOINT"]) == ["cargolint-webhooks"]
    assert "cargolint-webhooks" in scripts
    # The worker's and API's ports, as the Deployments expect them.
    assert set(final["EXPOSE"].split()) == {"8080", "9100"}
    settings = (DEPLOY / "base" / "settings.env").read_text()
    assert "CARGOLINT_API_PORT=8080" in settings
    assert "CARGOLINT_METRICS_PORT=9100" in settings


def test_no_dev_dependencies_or_build_tools_in_the_image() -> None:
    text = DOCKERFILE.read_text()
    assert "[dev]" not in text
    assert "pip install -e" not in text
    assert "--editable" not in text
    final = _stages()[-1]
    assert not [i for i in final if i[0] == "RUN" and "pip install" in i[1]]
    copies = [i[1] for i in final if i[0] == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "only the built venv is copied"


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.removeprefix("!").rstrip("/")
            if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
                result = not negate
        return result

    copied = [
        source
        for word, args in _stages()[0]
        if word == "COPY"
        for source in args.split()[:-1]
        if not source.startswith("--")
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore excludes {source}"
    for private in (".venv", ".git", "tests", "deploy", ".ci"):
        assert ignored(private), f".dockerignore must exclude {private}"

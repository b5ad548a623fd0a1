"""deploy/tools/install is idempotent: with everything present it changes nothing, quickly."""

from __future__ import annotations

import os
import time

import pytest

from tests.deploy.conftest import DEPLOY, run, tool

# Needs the tools deploy/tools/install provides.
pytestmark = pytest.mark.slow


def test_install_is_a_quick_no_op_when_everything_is_there() -> None:
    script = DEPLOY / "tools" / "install"
    assert os.access(script, os.X_OK)
    for name in ("promtool", "kubectl", "hadolint"):
        tool(name)
    started = time.monotonic()
    result = run(script, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "", "nothing was missing, so nothing is installed or said"
    assert time.monotonic() - started < 10

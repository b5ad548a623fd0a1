"""The alert rules: valid for promtool, unit-tested one by one, documented, and generated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, load_script, render, run, tool
from tests.deploy.promql import ALERTS, alert_rules

# Runs promtool.
pytestmark = pytest.mark.slow

RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))
README = DEPLOY / "README.md"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_promtool_checks_the_rules() -> None:
    result = run(tool("promtool"), "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rendered_prometheus_rule(tmp_path: Path) -> None:
    rule = next(d for d in render("overlays/production") if d["kind"] == "PrometheusRule")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    result = run(tool("promtool"), "check", "rules", rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


@pytest.mark.parametrize("path", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = run(tool("promtool"), "test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    firing: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing.add(check["alertname"])
    assert {rule["alert"] for rule in alert_rules()} == firing


def test_every_alert_is_documented_with_a_runbook_section() -> None:
    anchors = _anchors(README.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"deploy/README.md#{name.lower()}"
        assert name.lower() in anchors, f"deploy/README.md has no section {name}"


def test_the_committed_prometheus_rule_is_generated_from_the_rules() -> None:
    generate = load_script(DEPLOY / "prometheus" / "generate.py")
    assert generate.TARGET.read_text() == generate.render(), "run deploy/prometheus/generate.py"

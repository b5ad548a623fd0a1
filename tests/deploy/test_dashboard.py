"""The Grafana dashboard: generated, complete, and asking only for labels the code sets."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.conftest import DEPLOY, load_script
from tests.deploy.promql import (
    DASHBOARD,
    TARGET_LABELS,
    alert_rules,
    catalogue_labels,
    dashboard_exprs,
    family_of,
    grouping_labels,
    matcher_labels,
    metric_names,
)


def _panels() -> list[dict[str, object]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_the_committed_dashboard_is_generated_from_code() -> None:
    generate = load_script(DEPLOY / "grafana" / "generate.py")
    assert DASHBOARD.read_text() == generate.render(), "run deploy/grafana/generate.py"


def test_the_dashboard_has_a_prometheus_data_source_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${" + source["name"] + "}"


@pytest.mark.parametrize("panel", _panels(), ids=lambda p: str(p["title"]))
def test_every_panel_has_queries_a_unit_and_the_variable_data_source(
    panel: dict[str, object],
) -> None:
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["fieldConfig"]["defaults"]["unit"]  # type: ignore[index]
    targets = panel["targets"]
    assert isinstance(targets, list)
    assert targets
    for target in targets:
        assert target["expr"].strip()
        assert metric_names(target["expr"]), target["expr"]
        assert target["datasource"] == panel["datasource"]
        # A legend may only name labels the query keeps.
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]):
            assert label in grouping_labels(target["expr"]), (label, target["expr"])


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_labels_the_code_sets(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    catalogue = catalogue_labels()
    for expr in exprs:
        allowed = set(TARGET_LABELS)
        for name in metric_names(expr):
            family = family_of(name, set(catalogue))
            assert family is not None, f"{name} is in no metric catalogue"
            allowed |= catalogue[family]
            if name.endswith("_bucket"):
                allowed.add("le")
        used = matcher_labels(expr) | grouping_labels(expr)
        assert used <= allowed, f"{expr}: labels {used - allowed} are never set"

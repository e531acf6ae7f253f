"""contrib/prometheus and contrib/grafana: Prometheus accepts the alerting
rules (``promtool check rules``, Debian's ``prometheus`` package) and their
unit tests pass (``promtool test rules``), every alert has a case where it
fires and one where it must not, every metric the rules and the dashboard
name is one bridge/metrics.py exports (a renamed metric fails here, not in
someone's Prometheus), and Grafana can load the dashboard: valid JSON, unique
panel ids, a place on the grid for every panel and no two on the same
cells, and every query PromQL that promtool parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from bridge.metrics import Metrics
from tests.helpers import ROOT

RULES = ROOT / "contrib" / "prometheus" / "talkbridge-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "talkbridge-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "talkbridge-dashboard.json"

SEVERITIES = {"warning", "error", "critical"}
# series Prometheus itself makes for every target
PROMETHEUS_OWN = {"up"}
# labels Prometheus adds to every series it scrapes
TARGET_LABELS = {"instance", "job"}
# Grafana's variables, as a query sees them once Grafana filled them in
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "instance": ".*", "account": ".*"}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (Debian's package ships /usr/bin/promtool)"
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- metric names ----------------------------------------------------------------------
def exported_names(metrics: Metrics) -> set[str]:
    """The sample names a scrape of this registry can carry: a counter NAME
    is exported as NAME_total, a histogram as NAME_bucket, _sum and _count."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def declared_labels(metrics: Metrics) -> dict[str, set[str]]:
    """Sample name -> the label names bridge/metrics.py declares for it."""
    out: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(metric._type, ("",))
            for suffix in suffixes:
                out[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return out


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, the label names its matchers name) for every ``metric{...}`` of an expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return [
        (name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)))
        for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", text)
    ]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once the
    strings, label matchers, ranges, grouping clauses, offsets, functions
    (a name before a parenthesis) and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    words = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", text)
    return set(words) - {"and", "or", "unless", "bool", "inf", "nan", "Inf", "NaN"}


def test_metric_names_finds_every_name_and_only_names() -> None:
    expr = (
        'sum by (account) (rate(talkbridge_events_in_total{account=~"a.b"}[5m])) > 1e3 '
        "and on (job, instance) (up offset 10m) or histogram_quantile(0.9, talkbridge_x_bucket)"
    )
    assert metric_names(expr) == {"talkbridge_events_in_total", "up", "talkbridge_x_bucket"}
    # a renamed metric is one the registry does not export
    assert "talkbridge_event_in_total" not in exported_names(Metrics())
    assert {"talkbridge_events_in_total", "talkbridge_delivery_latency_seconds_bucket"} <= exported_names(Metrics())
    # and a matcher on a label the metric does not have is found
    assert selector_labels('talkbridge_stream_lag{account=~"a", stream="{x}"} + up{job="t"}') == [
        ("talkbridge_stream_lag", {"account", "stream"}),
        ("up", {"job"}),
    ]
    assert "account" not in declared_labels(Metrics())["talkbridge_stream_lag"]


def assert_matchers_name_declared_labels(where: str, expr: str) -> None:
    """A matcher on a label the metric lacks selects nothing, silently: refuse it."""
    declared = declared_labels(Metrics())
    for name, labels in selector_labels(expr):
        known = declared.get(name, set()) | TARGET_LABELS
        assert labels <= known, (where, name, sorted(labels - known))


def test_every_metric_the_rules_name_is_exported() -> None:
    exported = exported_names(Metrics()) | PROMETHEUS_OWN
    for rule in alerting_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], sorted(names - exported))
        assert_matchers_name_declared_labels(rule["alert"], rule["expr"])


# --- the rules -------------------------------------------------------------------------
def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in result.stdout, result.stdout


def test_the_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            (firing if expected else quiet).add(case["alertname"])
            for alert in expected:  # a firing case says what the alert carries
                assert alert.get("exp_annotations", {}).keys() == {"summary", "description"}, case
    alerts = {rule["alert"] for rule in alerting_rules()}
    assert alerts - firing == set(), "alerts never seen firing"
    assert alerts - quiet == set(), "alerts never seen staying quiet"
    assert (firing | quiet) - alerts == set(), "cases for alerts that do not exist"


def test_every_alert_says_how_long_how_bad_and_about_what() -> None:
    rules = alerting_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations.keys() == {"summary", "description"}, rule["alert"]
        text = annotations["summary"] + annotations["description"]
        for label in ("account", "room", "instance", "what"):
            if re.search(rf"\bby \([^)]*\b{label}\b", rule["expr"]) or f'"{label}"' in rule["expr"]:
                assert f"$labels.{label}" in text, (rule["alert"], label)


# --- the dashboard -----------------------------------------------------------------------
def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def overlapping(panels: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Pairs of panel ids whose grid rectangles share a cell."""
    pairs = []
    for i, a in enumerate(panels):
        for b in panels[i + 1 :]:
            ga, gb = a["gridPos"], b["gridPos"]
            if (
                ga["x"] < gb["x"] + gb["w"]
                and gb["x"] < ga["x"] + ga["w"]
                and ga["y"] < gb["y"] + gb["h"]
                and gb["y"] < ga["y"] + ga["h"]
            ):
                pairs.append((a["id"], b["id"]))
    return pairs


def filled_in(query: str) -> str:
    """A query as Grafana sends it once its variables are filled in."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], query)


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression of the dashboard (panels' targets and the
    variables' label_values selectors), by where it is."""
    queries = {}
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            queries[f"panel {panel['id']} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
            assert selector is not None, variable
            queries[f"variable {variable['name']}"] = selector.group(1)
    return queries


def test_overlapping_finds_panels_sharing_cells() -> None:
    def panel(id_: int, x: int, y: int, w: int, h: int) -> dict[str, Any]:
        return {"id": id_, "gridPos": {"x": x, "y": y, "w": w, "h": h}}

    assert overlapping([panel(1, 0, 0, 12, 8), panel(2, 12, 0, 12, 8), panel(3, 0, 8, 24, 1)]) == []
    assert overlapping([panel(1, 0, 0, 12, 8), panel(2, 11, 7, 4, 4)]) == [(1, 2)]


def test_the_dashboard_is_one_grafana_loads() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"instance", "account"} <= variables.keys()
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("x", "y", "w", "h")), panel["id"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["id"]
        if panel["type"] != "row":
            assert panel["targets"], panel["id"]
            for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
                assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["id"]
    assert overlapping(panels) == []


def test_every_dashboard_query_is_promql_naming_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    exported = exported_names(Metrics()) | PROMETHEUS_OWN
    for where, query in queries.items():
        names = metric_names(filled_in(query))
        assert names and names <= exported, (where, sorted(names - exported))
        assert_matchers_name_declared_labels(where, query)
    # promtool parses PromQL when it checks recording rules: one per query
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": "dashboard:" + re.sub(r"\W", "_", where), "expr": filled_in(query)}
                    for where, query in queries.items()
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout

"""The Grafana dashboard the chart ships (helm/kubetune/dashboards/kubetune.json).

A dashboard that names a metric nobody exports shows "No data" and nothing else, so every metric
name in every PromQL expression (panels and template variables) is checked against the names the
code exports: the operator's registry (kubetune_operator/metrics.py), the trainer's rank-0
exporter (kubetune_trainer/metrics.py) and the serving runtime's (kubetune_serve/metrics.py), read
from the prometheus_client registries themselves, so renaming a metric there fails this test.

The identifiers of an expression are found with a small PromQL tokenizer: strings, label matchers,
range selectors and grouping clauses are removed first, then every word that is not a function call,
a keyword, a number or a Grafana variable is a metric name. `__name__` matchers count too.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kubetune_operator import metrics as operator_metrics
from kubetune_serve.metrics import ServingMetrics
from kubetune_trainer.metrics import MetricsExporter

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubetune"
DASHBOARD = CHART / "dashboards" / "kubetune.json"
DATASOURCE = "${datasource}"
GRID_COLUMNS = 24

# The sample names prometheus_client exposes for a family of each type (the family's name is the
# counter's without `_total`). A type not listed fails the test until it is added here.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}

# --- PromQL identifiers --------------------------------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"([^"]*)"')
SELECTOR = re.compile(r"\{[^{}]*\}")
RANGE = re.compile(r"\[[^\[\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
TOKEN = re.compile(r"\$\{?\w+\}?|\d[\w.]*|[A-Za-z_:][\w:]*(?:\s*\()?")
IDENTIFIER = re.compile(r"^[A-Za-z_:][\w:]*$")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
KEYWORDS |= {"atan2", "inf", "nan", "Inf", "NaN"}
# Grafana's variable queries that contain PromQL: label_values(SELECTOR, label), query_result(EXPR).
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def name_matcher_names(expr: str) -> set[str]:
    """Metric names an expression selects by `__name__` (= or =~ with plain alternatives)."""
    names: set[str] = set()
    for op, value in NAME_MATCHER.findall(expr):
        alternatives = value.split("|") if op == "=~" else [value]
        for name in alternatives:
            assert IDENTIFIER.match(name), f"__name__ matcher {value!r}: only plain names can be checked"
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (functions, keywords, labels and numbers left out)."""
    names = name_matcher_names(expr)
    text = STRING.sub(" ", expr)
    for pattern in (SELECTOR, RANGE, GROUPING):
        text = pattern.sub(" ", text)
    for match in TOKEN.finditer(text):
        token = match.group()
        if token[0] == "$" or token[0].isdigit() or token.endswith("(") or token in KEYWORDS:
            continue
        names.add(token)
    return names


def variable_expr(variable: dict[str, Any]) -> str | None:
    """The PromQL in a query variable (label_values' selector or query_result's expression)."""
    if variable.get("type") != "query":
        return None
    query = variable["query"]
    query = query.get("query", "") if isinstance(query, dict) else query
    for form in (LABEL_VALUES, QUERY_RESULT):
        if match := form.match(query):
            return match.group(1)
    raise AssertionError(f"variable {variable['name']}: a query this test cannot read: {query!r}")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if (expr := variable_expr(variable)) is not None:
            yield f"variable {variable['name']}", expr


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    """Where the dashboard reads a metric that is not in `exported`, and which."""
    unknown = [(where, metric_names(expr) - exported) for where, expr in expressions(dashboard)]
    return {where: names for where, names in unknown if names}


# --- what the code exports -----------------------------------------------------------------------


def exposed(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


@pytest.fixture(scope="module")
def sources() -> dict[str, set[str]]:
    return {
        "operator": exposed(operator_metrics.REGISTRY),
        "trainer": exposed(MetricsExporter().registry),
        "serving": exposed(ServingMetrics().registry),
    }


@pytest.fixture(scope="module")
def exported(sources: dict[str, set[str]]) -> set[str]:
    return set().union(*sources.values())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# --- the tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, names",
    [
        ('kubetune_train_loss{namespace=~"$namespace", finetunejob=~"$job"}', {"kubetune_train_loss"}),
        (
            'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{endpoint=~"x|y"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("sum(a_total) by (le) / ignoring(pod) group_left(zone) b offset 1h", {"a_total", "b"}),
        ("clamp_max(step / total_steps, 1) > bool 0.5 and on (job) up", {"step", "total_steps", "up"}),
        ('{__name__=~"x_one|x_two", namespace="a"} or rate(c[5m:30s])', {"x_one", "x_two", "c"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)") * 3600', {"m"}),
        ("max by (phase) (kubetune_operator_finetunejobs)", {"kubetune_operator_finetunejobs"}),
    ],
)
def test_the_tokenizer_finds_exactly_the_metric_names(expr, names):
    assert metric_names(expr) == names


def test_a_name_matcher_that_cannot_be_checked_is_refused():
    with pytest.raises(AssertionError, match="only plain names"):
        metric_names('{__name__=~"kubetune_.*"}')


# --- the dashboard -------------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job", "adapterdeployment"} <= set(variables)


def test_every_panel_has_a_unique_id_and_its_own_place_on_the_grid(dashboard):
    ids = [panel["id"] for panel in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    boxes = []
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_COLUMNS, grid
        boxes.append((panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
    for i, (title, x0, y0, x1, y1) in enumerate(boxes):
        for other, a0, b0, a1, b1 in boxes[i + 1 :]:
            assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0, f"{title!r} overlaps {other!r}"


def test_every_query_reads_the_datasource_the_user_picks(dashboard):
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, (panel["title"], target["refId"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]


def test_every_metric_the_dashboard_reads_is_one_the_code_exports(dashboard, exported):
    for where, expr in expressions(dashboard):
        assert metric_names(expr), f"{where}: no metric in {expr!r}"
    assert unknown_metrics(dashboard, exported) == {}


def test_a_renamed_metric_is_caught(dashboard, exported):
    renamed = json.loads(
        json.dumps(dashboard).replace("kubetune_train_tokens_per_second", "kubetune_train_tokens_per_s")
    )
    ((where, names),) = unknown_metrics(renamed, exported).items()
    assert "'Tokens per second' A" in where and names == {"kubetune_train_tokens_per_s"}
    exported_without = exported - {"kubetune_serve_adapter_loaded"}
    assert set().union(*unknown_metrics(dashboard, exported_without).values()) == {"kubetune_serve_adapter_loaded"}


def test_the_dashboard_covers_jobs_adapters_and_the_operator(dashboard, sources):
    used = set().union(*(metric_names(expr) for _, expr in expressions(dashboard)))
    for source, names in sources.items():
        assert used & names, f"no panel reads the {source}'s metrics"
    wanted = {
        "kubetune_operator_finetunejobs",  # jobs by phase
        "kubetune_operator_gpu_hours_requested_total",
        "kubetune_operator_finetunejob_evaluation",
        "kubetune_operator_reconciles_total",
        "kubetune_operator_reconcile_duration_seconds_bucket",
        "kubetune_operator_leader",  # which replica reconciles (leader election)
        "kubetune_train_loss",
        "kubetune_train_tokens_per_second",
        "kubetune_train_step",
        "kubetune_train_total_steps",
        "kubetune_serve_requests_total",
        "kubetune_serve_request_duration_seconds_bucket",
        "kubetune_serve_generation_tokens_total",
        "kubetune_serve_adapter_loaded",
        "kubetune_serve_requests_in_flight",
    }
    assert wanted <= used, wanted - used


def test_the_labels_the_panels_filter_on_are_the_ones_the_podmonitors_write(dashboard):
    """Training and serving series carry the FineTuneJob's and AdapterDeployment's names only through
    the PodMonitors' relabelings (the pods' own metrics have no such label)."""
    podmonitor = (CHART / "templates" / "podmonitor.yaml").read_text()
    written = set(re.findall(r"targetLabel:\s*(\w+)", podmonitor))
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        for label, prefix in (("finetunejob", "kubetune_train_"), ("adapterdeployment", "kubetune_serve_")):
            if any(name.startswith(prefix) for name in names) and label in expr:
                assert label in written, f"{where}: label {label} is not written by templates/podmonitor.yaml"
    assert {"finetunejob", "adapterdeployment"} <= written

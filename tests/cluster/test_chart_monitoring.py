"""The chart's monitoring objects (values `monitoring.*`): a ServiceMonitor for the operator, PodMonitors
for training rank 0 and serving replicas, and the Grafana dashboard ConfigMap.

The PodMonitors are checked against the pods the operator really renders (finetunejob/render.py,
adapterdeployment/render.py, with the configuration the chart gives it): those pods are created in a
test namespace, the API server evaluates each monitor's label selector, and the monitor's port and
relabelings are applied to what it returns as Prometheus' Kubernetes discovery would (its
`__meta_kubernetes_pod_*` labels), so a renamed label, port or annotation on either side fails here.

Not covered: a server-side dry-run of the ServiceMonitor and PodMonitors, which needs the Prometheus
Operator's CRDs (monitoring.coreos.com/v1) in the cluster; they are not vendored here.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune.api import FineTuneJob
from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune_operator.adapterdeployment.render import render_adapterdeployment
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob.render import render_finetunejob

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubetune"
RELEASE_NS = "kubetune-system"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}
ALL_ON = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
)
JOB_SPEC = {
    "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
    "dataset": {"uri": "pvc://data/chat.jsonl", "format": "chat"},
    "hyperparameters": {"epochs": 1},
    "output": {"uri": "pvc://adapters/out"},
    "resources": {"nodes": 2, "gpusPerNode": 1},
}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # set by the Job controller on Indexed pods


# --- rendering -----------------------------------------------------------------------------------


def render(helm, *sets: str) -> list[dict]:
    args = ["template", "kubetune", "helm/kubetune", "--namespace", RELEASE_NS]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, suffix: str) -> dict:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    return doc


def chart_config(docs: list[dict], tmp_path: Path) -> OperatorConfig:
    """The operator's configuration as the chart renders it (its ConfigMap's config.yaml)."""
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if "config.yaml" in d.get("data", {})]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})


def workload_pods(config: OperatorConfig, namespace: str) -> dict[str, dict]:
    """Pods as the operator's renderers make them: both nodes of an Indexed training Job (with the
    completion index the Job controller adds) and one serving replica. Only what monitoring reads:
    labels, annotations, container ports."""
    job = FineTuneJob.model_validate(
        {"metadata": {"name": "tune", "namespace": namespace, "uid": "u-1"}, "spec": JOB_SPEC}
    )
    rendered_job = render_finetunejob(job, config).job
    assert rendered_job["spec"]["completionMode"] == "Indexed"  # what gives pods COMPLETION_INDEX
    ad = AdapterDeployment.model_validate(
        {
            "metadata": {"name": "support", "namespace": namespace, "uid": "u-2"},
            "spec": {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}},
        }
    )
    serving = render_adapterdeployment(ad, config).deployment["spec"]["template"]
    pods = {}
    for index in (0, 1):
        template = rendered_job["spec"]["template"]
        annotations = {**template["metadata"]["annotations"], COMPLETION_INDEX: str(index)}
        pods[f"tune-{index}"] = pod(f"tune-{index}", template, annotations)
    pods["support-0"] = pod("support-0", serving, serving["metadata"]["annotations"])
    return pods


def pod(name: str, template: dict, annotations: dict) -> dict:
    containers = [
        {"name": c["name"], "image": "registry.invalid/none:0", "ports": c.get("ports", [])}
        for c in template["spec"]["containers"]
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"], "annotations": annotations},
        # Never scheduled: only the API server's label selection is under test.
        "spec": {"containers": containers, "nodeSelector": {"kubetune.io/test-never": "true"}},
    }


# --- Prometheus' view of a PodMonitor ------------------------------------------------------------


def selector_text(selector: dict) -> str:
    """A metav1.LabelSelector as the label-selector string the API server takes."""
    parts = [f"{k}={v}" for k, v in selector.get("matchLabels", {}).items()]
    for expr in selector.get("matchExpressions", []):
        op, key = expr["operator"], expr["key"]
        if op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            parts.append(f"{key} {op.lower()} ({','.join(expr['values'])})")
    return ",".join(parts)


def sanitized(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def discovery_labels(pod: dict, port: dict) -> dict[str, str]:
    """Prometheus' kubernetes_sd (role pod) labels of one container port."""
    meta = pod["metadata"]
    labels = {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"]}
    labels["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
    labels["__meta_kubernetes_pod_container_port_number"] = str(port["containerPort"])
    for key, value in (meta.get("labels") or {}).items():
        labels[f"__meta_kubernetes_pod_label_{sanitized(key)}"] = value
    for key, value in (meta.get("annotations") or {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{sanitized(key)}"] = value
    return labels


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """The target's labels after `rules` (keep and replace, the only actions the chart uses), or None
    when a rule drops it."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["targetLabel"]] = match.expand(rule.get("replacement", r"\1").replace("$1", r"\1"))
        else:
            raise AssertionError(f"relabeling action {action!r} is not modelled by this test")
    return labels


def scraped(cluster, namespace: str, monitor: dict) -> dict[str, dict[str, str]]:
    """pod name -> target labels, for the pods of `namespace` that `monitor` scrapes."""
    pods = cluster.pods(namespace, selector_text(monitor["spec"]["selector"]))
    targets = {}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        for p in pods:
            for container in p["spec"]["containers"]:
                for port in container.get("ports", []):
                    if port.get("name") != endpoint["port"]:
                        continue
                    labels = relabel(discovery_labels(p, port), endpoint.get("relabelings", []))
                    if labels is not None:
                        targets[p["metadata"]["name"]] = labels
    return targets


# --- tests ---------------------------------------------------------------------------------------


def test_monitoring_is_off_by_default(helm):
    docs = render(helm)
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS]
    assert not [d for d in of_kind(docs, "ConfigMap") if "kubetune.json" in d.get("data", {})]


def test_each_switch_renders_only_its_own_objects(helm):
    kinds = {}
    for switch in ALL_ON:
        docs = render(helm, switch)
        kinds[switch.split(".")[1]] = sorted(
            d["kind"] for d in docs if d["kind"] in MONITORING_KINDS or "kubetune.json" in d.get("data", {})
        )
    assert kinds == {
        "serviceMonitor": ["ServiceMonitor"],
        "podMonitor": ["PodMonitor", "PodMonitor"],
        "grafanaDashboard": ["ConfigMap"],
    }


def test_the_service_monitor_scrapes_the_operators_metrics_port(helm):
    docs = render(
        helm, *ALL_ON, "monitoring.serviceMonitor.interval=15s", "monitoring.serviceMonitor.labels.release=prom"
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == RELEASE_NS
    assert monitor["metadata"]["labels"]["release"] == "prom"  # what kube-prometheus-stack selects on
    assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == "kubetune"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    selected = [
        s
        for s in of_kind(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["kubetune-operator-metrics"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")
    assert endpoint["honorLabels"] is True  # the evaluation gauge's own `namespace` label is kept
    # The named Service port leads to the operator container's metrics port.
    ports = [p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert len(ports) == 1, f"the Service has no port named {endpoint['port']!r}"
    port = ports[0]
    (deployment,) = of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": port["targetPort"], "containerPort": port["port"]} in container["ports"]
    assert f"--metrics-port={port['port']}" in container["args"]


@pytest.mark.parametrize(
    "sets, namespace_selector",
    [((), {"any": True}), (("watchNamespaces={ml,team-a}",), {"matchNames": ["ml", "team-a"]})],
)
def test_the_pod_monitors_look_where_the_operator_works(helm, sets, namespace_selector):
    docs = render(helm, *ALL_ON, *sets, "monitoring.podMonitor.interval=10s", "monitoring.podMonitor.labels.team=ml")
    monitors = of_kind(docs, "PodMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        assert monitor["metadata"]["namespace"] == RELEASE_NS
        assert monitor["metadata"]["labels"]["team"] == "ml"
        assert monitor["spec"]["namespaceSelector"] == namespace_selector
        assert all(e["interval"] == "10s" and e["path"] == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"])


def test_the_pod_monitors_scrape_training_rank_0_and_every_serving_replica(cluster, namespace, helm, tmp_path):
    docs = render(helm, *ALL_ON)
    config = chart_config(docs, tmp_path)
    pods = workload_pods(config, namespace)
    # The operator's own pod, as the chart makes it: no PodMonitor may take it.
    (deployment,) = of_kind(docs, "Deployment")
    pods["operator"] = pod("operator", deployment["spec"]["template"], {})
    cluster.apply(*pods.values(), namespace=namespace)

    training = scraped(cluster, namespace, named(docs, "PodMonitor", "-training"))
    assert list(training) == ["tune-0"]  # rank 0 only: tune-1 has the port but serves nothing
    assert training["tune-0"]["finetunejob"] == "tune"
    assert training["tune-0"]["__meta_kubernetes_pod_container_port_number"] == str(config.trainer_metrics_port)

    serving = scraped(cluster, namespace, named(docs, "PodMonitor", "-serving"))
    assert list(serving) == ["support-0"]
    assert serving["support-0"]["adapterdeployment"] == "support"


def test_the_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar(cluster, namespace, helm):
    docs = render(helm, *ALL_ON)
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if "kubetune.json" in d.get("data", {})]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kubetune.json"]) == json.loads(
        (CHART / "dashboards" / "kubetune.json").read_text()
    )
    # Labels are the user's to set: another sidecar label replaces the default's value.
    docs = render(
        helm,
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.grafanaDashboard.labels.grafana_dashboard=kubetune",
    )
    (relabelled,) = [d for d in of_kind(docs, "ConfigMap") if "kubetune.json" in d.get("data", {})]
    assert relabelled["metadata"]["labels"]["grafana_dashboard"] == "kubetune"
    # The API server takes it as it is (size, keys, labels).
    config_map["metadata"]["namespace"] = namespace
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(config_map), check=False)
    assert result.returncode == 0, result.stderr

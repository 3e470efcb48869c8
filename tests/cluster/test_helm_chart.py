"""The Helm chart: lints, renders objects the API server accepts, and configures the operator it installs."""

import json

import pytest
import yaml

from kubetune_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster

# What the operator calls (kubetune_operator/k8s.py, writes.py and the kinds' reconcile.py): children
# are read, then server-side applied (PATCH, which creates an absent object too).
NEEDED = [
    ("kubetune.io", "finetunejobs", "watch"), ("kubetune.io", "finetunejobs/status", "patch"),
    ("kubetune.io", "adapterdeployments", "watch"), ("kubetune.io", "adapterdeployments/status", "patch"),
    ("", "configmaps", "create"), ("", "services", "create"), ("batch", "jobs", "create"), ("batch", "jobs", "patch"),
    ("batch", "jobs", "delete"), ("apps", "deployments", "create"), ("", "pods", "list"), ("", "events", "create"),
    ("", "configmaps", "get"), ("", "configmaps", "patch"), ("", "services", "get"), ("", "services", "patch"),
    ("batch", "jobs", "get"), ("apps", "deployments", "get"), ("apps", "deployments", "patch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"), ("", "namespaces", "watch"),
]  # fmt: skip


def render(helm, *sets: str) -> list[dict]:
    args = ["template", "kubetune", "helm/kubetune", "--namespace", "kubetune-system"]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_the_rendered_config_is_what_the_operator_reads(helm, tmp_path):
    docs = render(helm, "watchNamespaces={ml,team-a}", "config.trainerImage=registry.local/trainer:1")
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    config = OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})
    assert config.namespaces == ("ml", "team-a")
    assert config.trainer_image == "registry.local/trainer:1"
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBETUNE_CONFIG", "value": "/etc/kubetune-operator/config.yaml"} in container["env"]
    assert container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_covers_what_the_operator_does(helm):
    rules = by_kind(render(helm), "ClusterRole")["rules"]
    for group, resource, verb in NEEDED:
        assert any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules), (
            group,
            resource,
            verb,
        )


def test_the_api_server_accepts_the_rendered_objects(helm, cluster, crds, namespace):
    docs = render(helm)
    for doc in docs:
        if doc["metadata"].get("namespace"):
            doc["metadata"]["namespace"] = namespace
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=json.dumps({"kind": "List", "apiVersion": "v1", "items": docs})
    )
    assert result.returncode == 0, result.stderr
